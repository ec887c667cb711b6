"""`aoti`: torch.export + AOTInductor, packaged as a `.pt2` (CPU and CUDA)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
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
FAST_LOAD_ENV = "MONAI_TRT_AOTI_FAST_LOAD"


def _inductor(device: torch.device):
    """Import torch._inductor; for CUDA engines, skip Inductor's CPU vector-ISA self-check on import.

    In a fresh process that check test-loads a library in ~10 Python subprocesses (measured: 2.8 s on a 2-core
    CPU machine, ~36 s on the H100 machine), the bulk of a cache-hit start-up. TORCHINDUCTOR_VEC_ISA_OK=1 trusts
    cpuinfo instead, which only matters for CPU code generation. It is set only when unset, only before the first
    import, only for CUDA devices, and not at all with env MONAI_TRT_AOTI_FAST_LOAD=0.
    """
    if (
        device.type == "cuda"
        and "torch._inductor" not in sys.modules
        and "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ
        and os.environ.get(FAST_LOAD_ENV, "1") != "0"
    ):
        os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "1"
        logger.info("set TORCHINDUCTOR_VEC_ISA_OK=1 to skip Inductor's CPU ISA self-check (%s=0 to keep it)",
                    FAST_LOAD_ENV)
    import torch._inductor  # noqa: PLC0415

    return torch._inductor


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
        if not hasattr(_inductor(device), "aoti_compile_and_package"):
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
        _inductor(job.device).aoti_compile_and_package(
            program, package_path=str(out_dir / ARTIFACT), inductor_configs=configs
        )
        return [ARTIFACT]

    def load(self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device) -> Engine:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        runner = _inductor(device).aoti_load_package(str(entry_dir / ARTIFACT), device_index=index)
        return CallableEngine(runner)

