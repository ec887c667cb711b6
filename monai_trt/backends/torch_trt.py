"""`torch_trt`: Torch-TensorRT dynamo compile of the exported program, saved through Torch-TensorRT.

The graph is `monai_trt.export.program.export_program(job)` (torch.export with the job's dynamic dimensions); it is
compiled with `torch_tensorrt.dynamo.compile`, saved with
`torch_tensorrt.save(..., output_format="exported_program")`, then loaded with `torch_tensorrt.load` (or
`torch.export.load`).

Precision: where the installed Torch-TensorRT compiles with explicit typing (TensorRT 11, or a version whose
`use_explicit_typing` defaults to True), the graph is cast by the core before export and compiled with
`use_explicit_typing=True`; otherwise the graph stays fp32 and `enabled_precisions` lets TensorRT pick fp16/bf16.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.utils import optional_import

from monai_trt.backends import tensorrt as tensorrt_backend
from monai_trt.backends.base import BuildJob, CallableEngine, Engine
from monai_trt.backends.trt_runtime import device_reason, on_device
from monai_trt.errors import PatchError
from monai_trt.export.program import export_program

__all__ = ["TorchTensorRTBackend"]

torch_tensorrt, _HAS_TORCH_TRT = optional_import("torch_tensorrt")
logger = logging.getLogger(__name__)
ARTIFACT = "engine.pt2"  # torch.export.save writes a PT2 archive
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Settings monai_trt derives from the entry itself; `compile_settings` may not override them.
_RESERVED = ("inputs", "arg_inputs", "device", "enabled_precisions", "use_explicit_typing", "disable_tf32")


class TorchTensorRTBackend:
    """Torch-TensorRT engines; `build_args` are Torch-TensorRT compilation settings (see default_build_args)."""

    name: ClassVar[str] = "torch_trt"
    multi_profile: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    refit_modes: ClassVar[tuple[str, ...]] = ("none",)
    cuda_graphs: ClassVar[str] = ""
    default_build_args: ClassVar[Mapping[str, Any]] = {
        "min_block_size": 5,
        "optimization_level": 3,
        "workspace_size": 0,
        "require_full_compilation": False,
        "truncate_double": False,
        "torch_executed_ops": [],
        "version_compatible": False,
        "hardware_compatible": False,
        "use_python_runtime": False,
        "compile_settings": {},  # any other torch_tensorrt.dynamo.compile keyword, passed through
    }

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when Torch-TensorRT can compile and run on `device`, else why not."""
        if not _HAS_TORCH_TRT:
            return "the torch_tensorrt package is not installed (it needs TensorRT and a matching torch)"
        return device_reason(torch_tensorrt, "Torch-TensorRT", device)

    def versions(self) -> dict[str, str]:
        """torch, Torch-TensorRT and TensorRT versions (part of the cache key)."""
        versions = {"torch": torch.__version__, "torch_tensorrt": str(getattr(torch_tensorrt, "__version__", "?"))}
        versions.update({k: v for k, v in tensorrt_backend.TensorRTBackend().versions().items() if k != "torch"})
        return versions

    def graph_precision(self, precision: str) -> str:
        """The precision itself with explicit typing; fp32 (cast by TensorRT) with enabled_precisions."""
        if precision in _HALF and _HAS_TORCH_TRT and not _explicit_typing():
            return "fp32"
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        """torch.export → Torch-TensorRT compile → `engine.pt2` in `out_dir`."""
        settings = compile_settings(job)
        specs = _input_specs(job)
        program = export_program(job)
        compile_fn = torch_tensorrt.dynamo.compile
        with on_device(job.device):
            compiled = compile_fn(program, **{_inputs_keyword(compile_fn): specs}, **settings)
        torch_tensorrt.save(
            compiled, str(out_dir / ARTIFACT), output_format="exported_program",
            **{_inputs_keyword(torch_tensorrt.save): specs},
        )
        return [ARTIFACT]

    def load(
        self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device, use_cuda_graph: bool = False
    ) -> Engine:
        """Load `engine.pt2` through Torch-TensorRT's own loader."""
        loader = getattr(torch_tensorrt, "load", None) or torch.export.load
        with on_device(device):
            program = loader(str(entry_dir / ARTIFACT))
        return CallableEngine(program.module() if hasattr(program, "module") else program)


def _explicit_typing() -> bool:
    """Whether this Torch-TensorRT wants precision in the graph (explicit typing) rather than enabled_precisions."""
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    if "use_explicit_typing" not in params:
        return False
    if (tensorrt_backend.installed_major() or 0) >= 11:
        return True  # TensorRT 11 has no weak typing
    return params["use_explicit_typing"].default is True


def compile_settings(job: BuildJob) -> dict[str, Any]:
    """Keyword arguments for `torch_tensorrt.dynamo.compile` from the entry's precision and build_args.

    Raises:
        PatchError: `compile_settings` overrides a named build_arg or a setting monai_trt derives, or names a
            keyword this Torch-TensorRT does not accept.
    """
    args = dict(job.build_args)
    extra = dict(args.pop("compile_settings"))
    clash = sorted(set(extra) & (set(args) | set(_RESERVED)))
    if clash:
        raise PatchError(f"build_args['compile_settings'] may not set {clash}: use the build_args key or the "
                         "entry's precision instead")
    settings = {**args, **extra, "disable_tf32": job.precision == "fp32"}
    params = inspect.signature(torch_tensorrt.dynamo.compile).parameters
    if _explicit_typing():
        settings["use_explicit_typing"] = True
    else:
        settings["enabled_precisions"] = {torch.float32} | ({_HALF[job.precision]} if job.precision in _HALF else set())
        if "use_explicit_typing" in params:
            settings["use_explicit_typing"] = False
    if job.device.type == "cuda" and "device" in params:
        settings["device"] = job.device
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(settings) - set(params))
        if unknown:
            raise PatchError(f"torch_tensorrt {getattr(torch_tensorrt, '__version__', '?')} does not accept "
                             f"compile settings {unknown}")
    return settings


def _input_specs(job: BuildJob) -> list[Any]:
    """One torch_tensorrt.Input per tensor: min/max over all profiles (one engine serves them all), opt of the first."""
    specs = []
    for index, (tensor, ranges) in enumerate(zip(job.example_inputs, job.ranges)):
        opt = job.profiles[0][index][1]
        specs.append(torch_tensorrt.Input(
            min_shape=tuple(lo for lo, _ in ranges), opt_shape=tuple(opt), max_shape=tuple(hi for _, hi in ranges),
            dtype=tensor.dtype,
        ))
    return specs


def _inputs_keyword(function: Any) -> str:
    """`arg_inputs` where the function has it (newer Torch-TensorRT), else the older `inputs`."""
    return "arg_inputs" if "arg_inputs" in inspect.signature(function).parameters else "inputs"

