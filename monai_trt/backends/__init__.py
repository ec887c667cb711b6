"""Engine backends, one file each, behind the protocol in `base.py`; `resolve_method` implements `auto`."""

from __future__ import annotations

import logging

import torch

from monai_trt.backends.aoti import AotiBackend
from monai_trt.backends.base import Backend, BuildJob, Engine, merge_build_args
from monai_trt.backends.onnxruntime import OnnxRuntimeBackend
from monai_trt.backends.tensorrt import TensorRTBackend
from monai_trt.backends.torch_trt import TorchTensorRTBackend
from monai_trt.errors import BackendUnavailable

__all__ = ["Backend", "BuildJob", "Engine", "get_backend", "resolve_method", "merge_build_args", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type] = {
    "onnx": TensorRTBackend,
    "torch_trt": TorchTensorRTBackend,
    "aoti": AotiBackend,
    "onnxruntime": OnnxRuntimeBackend,
}
# `auto` order per device type: first available wins.
AUTO_ORDER = {"cuda": ("onnx", "aoti", "onnxruntime"), "cpu": ("onnxruntime", "aoti")}


def get_backend(name: str) -> Backend:
    """The backend instance for a method name (not `auto`)."""
    return BACKENDS[name]()


def resolve_method(method: str, device: torch.device, precision: str) -> tuple[Backend, str]:
    """Pick the backend for `method` on `device`.

    Returns:
        (backend, why): `why` explains an `auto` choice for the log.

    Raises:
        BackendUnavailable: the named method cannot run here, or `auto` found nothing usable.
    """
    if method != "auto":
        backend = get_backend(method)
        reason = backend.unavailable_reason(device)
        if reason:
            raise BackendUnavailable(f"method '{method}' is not available on {device}: {reason}")
        return backend, f"method '{method}' was requested"
    skipped = []
    for name in AUTO_ORDER.get(device.type, ()):
        backend = get_backend(name)
        reason = backend.unavailable_reason(device)
        if reason is None and precision not in backend.precisions:
            reason = f"it does not support {precision}"
        if reason is None:
            why = f"auto chose '{name}' on {device.type}" + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
            return backend, why
        skipped.append(f"{name}: {reason}")
    reasons = "; ".join(skipped or ["unsupported device"])
    raise BackendUnavailable(f"no engine method is available on {device}: {reasons}")
