"""`torch_trt`: Torch-TensorRT dynamo compile of the exported program."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from monai.utils import optional_import

from monai_trt.backends.base import BuildJob, Engine
from monai_trt.errors import BackendUnavailable

__all__ = ["TorchTensorRTBackend"]

torch_tensorrt, _HAS_TORCH_TRT = optional_import("torch_tensorrt")


class TorchTensorRTBackend:
    """Torch-TensorRT engines."""

    name: ClassVar[str] = "torch_trt"
    multi_profile: ClassVar[bool] = False
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "tf32", "fp16", "bf16")
    default_build_args: ClassVar[Mapping[str, Any]] = {}

    def unavailable_reason(self, device: torch.device) -> str | None:
        if not _HAS_TORCH_TRT:
            return "the torch_tensorrt package is not installed (it needs TensorRT and a matching torch)"
        if device.type != "cuda" or not torch.cuda.is_available():
            return "Torch-TensorRT engines need a CUDA device"
        return None

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__, "torch_tensorrt": getattr(torch_tensorrt, "__version__", "missing")}

    def graph_precision(self, precision: str) -> str:
        return precision

    def build(self, job: BuildJob, out_dir: Path) -> list[str]:
        raise BackendUnavailable(self.unavailable_reason(job.device) or "the torch_trt method is not built yet")

    def load(self, entry_dir: Path, meta: Mapping[str, Any], device: torch.device) -> Engine:
        raise BackendUnavailable(self.unavailable_reason(device) or "the torch_trt method is not built yet")
