"""`aoti`: torch.export + AOTInductor, packaged as a `.pt2` (CPU and CUDA)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from monai_trt.backends.aoti_isa import gpu_build_probe_skipped, probe_skipped
from monai_trt.backends.base import UNREFITTED, BuildJob, CallableEngine, Engine, require_weights
from monai_trt.backends.cuda_graph import GraphedEngine
from monai_trt.errors import EngineBuildError
from monai_trt.events import report
from monai_trt.export.program import export_program

__all__ = ["AotiBackend"]

logger = logging.getLogger(__name__)
ARTIFACT = "engine.pt2"
CONSTANTS = "constants.pt"  # graph constants that are not weights (refit modes only)
_FOLDED = "_FOLDED_CONST_"  # constants AOTInductor derives from weights at load (runtime constant folding)
_ONE_PASS = {"triton.autotune_at_compile_time": True}  # CUDA: kernels autotuned while the C++ wrapper is generated


def _inductor():
    import torch._inductor

    return torch._inductor


def load_package(path: Path, device_index: int, single_threaded: bool = False) -> Any:
    """`aoti_load_package` without Inductor's CPU vector-ISA probe on this thread (see :mod:`.aoti_isa`).

    `single_threaded`: the runner AOTInductor provides for CUDA graph capture (no events, no model pool).

    onnxruntime, when installed, is imported first: on the lent H200 (torch 2.11+cu130, onnxruntime 1.30 CPU), every
    load in a process that had not imported it died with SIGSEGV inside torch's package loader, and none did after
    it (`benchmarks/session8_diag2.sh`; importing onnx or torch._inductor instead did not help; cause not found)."""
    if importlib.util.find_spec("onnxruntime") is not None:
        importlib.import_module("onnxruntime")
    with probe_skipped():
        return _inductor().aoti_load_package(str(path), run_single_threaded=single_threaded,
                                             device_index=device_index)


class AotiBackend:
    """AOTInductor engines. `build_args` are Inductor options (`max_autotune`, `coordinate_descent_tuning`...).

    CUDA builds autotune Triton kernels in one code-generation pass (Inductor's `triton.autotune_at_compile_time`)
    instead of generating, compiling and running a Python wrapper first, and skip the CPU vector-ISA probe
    (:mod:`.aoti_isa`); `inductor_configs` can set any Inductor option back."""

    name: ClassVar[str] = "aoti"
    multi_profile: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    refit_modes: ClassVar[tuple[str, ...]] = ("none", "identical", "refit")
    cuda_graphs: ClassVar[str] = "default"  # inputs are copied into the graphs' buffers: nothing asked of callers
    default_build_args: ClassVar[Mapping[str, Any]] = {
        "max_autotune": False,
        "coordinate_descent_tuning": False,
        "freezing": True,  # constant-folds baked-in weights, lets Inductor pick conv layouts (off for refit modes)
        "autotune_pointwise": False,  # True: benchmark several configs per pointwise Triton kernel (slower build)
        "inductor_configs": {},
    }

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not hasattr(_inductor(), "aoti_compile_and_package"):
            return f"torch {torch.__version__} has no AOTInductor packaging (needs torch >= 2.6)"
        if device.type == "cpu" and not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
            return "AOTInductor on CPU needs a C++ compiler (c++/g++/clang++) on PATH"
        if device.type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        if device.type not in ("cpu", "cuda"):
            return f"device type {device.type} is not supported by AOTInductor here"
        return None

    def versions(self) -> dict[str, str]:
        versions = {"torch": torch.__version__}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            pass
        return versions

    def graph_precision(self, precision: str) -> str:
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        program = export_program(job)
        report(job.label, "engine build (AOTInductor)")
        configs = {
            "aot_inductor.check_lowerbound": False,
            "max_autotune": job.build_args["max_autotune"],
            "coordinate_descent_tuning": job.build_args["coordinate_descent_tuning"],
            "freezing": job.build_args["freezing"],
            "triton.autotune_pointwise": job.build_args["autotune_pointwise"],
            **(_ONE_PASS if job.device.type == "cuda" else {}),
            **dict(job.build_args["inductor_configs"]),
        }
        artifacts = [ARTIFACT]
        if job.refit != "none":
            # Weights stay out of the package; whatever Inductor would fold from them is folded at load instead.
            configs.update({
                "freezing": False,
                "aot_inductor.package_constants_in_so": False,
                "aot_inductor.use_runtime_constant_folding": True,
            })
            constants = {  # lifted tensor constants; non-persistent buffers are there too, but they are weights
                k: v.detach().cpu() for k, v in program.constants.items()
                if isinstance(v, torch.Tensor) and k not in job.weight_names
            }
            if constants:
                torch.save(constants, out_dir / CONSTANTS)
                artifacts.append(CONSTANTS)
        no_probe = gpu_build_probe_skipped() if job.device.type == "cuda" else contextlib.nullcontext()
        with no_probe:
            _inductor().aoti_compile_and_package(program, package_path=str(out_dir / ARTIFACT),
                                                 inductor_configs=configs)
        return artifacts

    def load(
        self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device, use_cuda_graph: bool = False
    ) -> Engine:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        graphs = use_cuda_graph and device.type == "cuda"
        runner = load_package(entry_dir / ARTIFACT, index, single_threaded=graphs)
        label = f"engine {entry_dir.name[:12]} on {device}"
        if meta.get("refit", "none") == "none":
            return _AotiEngine(runner, device, graphs, label)
        constants = {}
        if CONSTANTS in meta["artifacts"]:
            constants = torch.load(entry_dir / CONSTANTS, map_location=device, weights_only=True)
        return _RefittableAoti(runner, constants, device, graphs, label)


class _AotiEngine(CallableEngine):
    """A loaded `.pt2`; with `graphs`, its calls replay CUDA graphs (:class:`GraphedEngine`)."""

    def __init__(self, runner: Any, device: torch.device, graphs: bool, label: str) -> None:
        super().__init__(runner)
        self.graphs = GraphedEngine(super().__call__, device, label=label) if graphs else None

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.graphs(inputs) if self.graphs is not None else super().__call__(inputs)


class _RefittableAoti(_AotiEngine):
    """A weight-less `.pt2`: refuses to run until every weight it names has been loaded."""

    def __init__(self, runner: Any, constants: Mapping[str, torch.Tensor], device: torch.device, graphs: bool,
                 label: str) -> None:
        super().__init__(runner, device, graphs, label)
        expected = set(runner.get_constant_fqns())
        self._constants = {k: v for k, v in constants.items() if k in expected}  # the rest was folded at build
        self._device = device
        self._names = frozenset(n for n in expected if not n.startswith(_FOLDED) and n not in self._constants)
        self._loaded = False

    def refit(self, weights: Mapping[str, torch.Tensor]) -> None:
        self._loaded = False
        require_weights(self._names, weights)
        update = {**self._constants, **{n: weights[n].detach().to(self._device) for n in self._names}}
        self._function.load_constants(update, check_full_update=True)
        if self.graphs is not None:  # graphs read the weights at the addresses they were captured with
            self.graphs.forget()
        self._loaded = True

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self._loaded:
            raise EngineBuildError(UNREFITTED)
        return super().__call__(inputs)
