"""Test doubles of `tensorrt` and `torch_tensorrt`, and the context manager that installs them.

This directory is put on sys.path only while :func:`installed` is active; outside it, `import tensorrt` finds the
real package (or nothing). Installing also points the backends' module-level `trt` / `torch_tensorrt` objects at the
doubles and restores everything on exit (sys.modules, sys.path, environment, module attributes).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from monai_trt.backends import tensorrt as trt_backend
from monai_trt.backends import torch_trt as torch_trt_backend

DOUBLE_DIR = Path(__file__).resolve().parent
_OURS = ("tensorrt", "torch_tensorrt")


def _is_ours(name: str) -> bool:
    return any(name == root or name.startswith(root + ".") for root in _OURS)


@contextlib.contextmanager
def installed(trt_version: str, torch_trt_version: str = "2.14.0") -> Iterator[ModuleType]:
    """Install the doubles (TensorRT `trt_version`, Torch-TensorRT `torch_trt_version`); yields the tensorrt double."""
    saved = {name: module for name, module in sys.modules.items() if _is_ours(name)}
    for name in saved:
        del sys.modules[name]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MONAI_TRT_DOUBLE_VERSION", trt_version)
            patch.setenv("MONAI_TRT_DOUBLE_TORCH_TRT_VERSION", torch_trt_version)
            patch.syspath_prepend(str(DOUBLE_DIR))
            trt = importlib.import_module("tensorrt")
            torch_tensorrt = importlib.import_module("torch_tensorrt")
            patch.setattr(trt_backend, "trt", trt)
            patch.setattr(trt_backend, "_HAS_TRT", True)
            patch.setattr(torch_trt_backend, "torch_tensorrt", torch_tensorrt)
            patch.setattr(torch_trt_backend, "_HAS_TORCH_TRT", True)
            yield trt
    finally:
        for name in [n for n in sys.modules if _is_ours(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def real_tensorrt() -> ModuleType | None:
    """The real tensorrt module when it imports and CUDA is available, else None (tests marked `tensorrt` skip)."""
    if not torch.cuda.is_available():
        return None
    try:
        module = importlib.import_module("tensorrt")
    except Exception:  # PyPI stubs raise all kinds of errors at import
        return None
    if getattr(module, "__monai_trt_double__", False) or not hasattr(module, "Builder"):
        return None
    return module
