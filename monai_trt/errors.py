"""Exceptions raised by monai_trt. Each names what went wrong and what to do about it."""

from __future__ import annotations

__all__ = [
    "MonaiTrtError", "PatchError", "BackendUnavailable", "EngineBuildError", "ExportError", "CacheError", "UsageError",
]


class MonaiTrtError(RuntimeError):
    """Base class of every monai_trt error."""


class PatchError(MonaiTrtError, ValueError):
    """A `trt_patch` entry or the `trt` switch is invalid; raised before any work is done."""


class BackendUnavailable(MonaiTrtError):
    """The selected engine method cannot run here (package missing, no CUDA, unsupported version)."""


class EngineBuildError(MonaiTrtError):
    """Exporting or building an engine failed, or the built engine disagreed with PyTorch."""


class ExportError(EngineBuildError):
    """The network could not be exported to a graph (e.g. control flow on input values). Deterministic for a given
    cache key, so the failure is remembered in the cache and not retried until something in the key changes."""


class CacheError(MonaiTrtError):
    """A cache entry is unreadable, tampered with, or not usable on this machine."""


class UsageError(MonaiTrtError):
    """A command (`python -m monai_trt ...`) cannot proceed with what it was given; the message says what to change."""
