"""`onnx`: ONNX export → TensorRT engine (TensorRT 10 and 11)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.utils import optional_import

from monai_trt.backends.base import BuildJob, Engine
from monai_trt.errors import BackendUnavailable

__all__ = ["TensorRTBackend"]

trt, _HAS_TRT = optional_import("tensorrt")


class TensorRTBackend:
    """TensorRT engines built from the shared ONNX export."""

    name: ClassVar[str] = "onnx"
    multi_profile: ClassVar[bool] = True
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    default_build_args: ClassVar[Mapping[str, Any]] = {}

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not _HAS_TRT:
            return "the tensorrt package is not installed (pip install monai_trt[tensorrt] on a CUDA machine)"
        if device.type != "cuda" or not torch.cuda.is_available():
            return "TensorRT engines need a CUDA device"
        return None

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "tensorrt": getattr(trt, "__version__", "missing")}

    def graph_precision(self, precision: str) -> str:
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        raise BackendUnavailable(self.unavailable_reason(job.device) or "the onnx (TensorRT) method is not built yet")

    def load(self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device) -> Engine:
        raise BackendUnavailable(self.unavailable_reason(device) or "the onnx (TensorRT) method is not built yet")
