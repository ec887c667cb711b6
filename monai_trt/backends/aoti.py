"""`aoti`: torch.export + AOTInductor, packaged as a `.pt2` (CPU and CUDA)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from monai_trt.backends.base import BuildJob, CallableEngine, Engine
from monai_trt.progress import report
from monai_trt.export import export_program

__all__ = ["AotiBackend"]

logger = logging.getLogger(__name__)
ARTIFACT = "engine.pt2"


def _inductor():
    import torch._inductor  # noqa: PLC0415

    return torch._inductor


def load_package(path: Path, device_index: int) -> Any:
    """`aoti_load_package` without Inductor's CPU vector-ISA self-test.

    Loading calls `get_device_information`, which probes each CPU ISA by compiling a test library and dlopen-ing
    it in a fresh Python subprocess: measured 39-47 s on the H100 machine and 3-21 s on a 2-core CPU machine, in
    every fresh process. The result only feeds a "device information mismatch" warning, so the load trusts the
    CPU flags instead (`cpp.vec_isa_ok`) for the duration of the call; code generation elsewhere in the process
    keeps the real check (the patched answer is cached under its own key).
    """
    inductor = _inductor()
    with inductor.config.patch({"cpp.vec_isa_ok": True}):
        return inductor.aoti_load_package(str(path), device_index=device_index)


class AotiBackend:
    """AOTInductor engines. `build_args` are Inductor options (`max_autotune`, `coordinate_descent_tuning`...)."""

    name: ClassVar[str] = "aoti"
    multi_profile: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    default_build_args: ClassVar[Mapping[str, Any]] = {
        "max_autotune": False,
        "coordinate_descent_tuning": False,
        "freezing": False,
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
            import triton  # noqa: PLC0415

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
            **dict(job.build_args["inductor_configs"]),
        }
        _inductor().aoti_compile_and_package(
            program, package_path=str(out_dir / ARTIFACT), inductor_configs=configs
        )
        return [ARTIFACT]

    def load(self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device) -> Engine:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        return CallableEngine(load_package(entry_dir / ARTIFACT, index))

