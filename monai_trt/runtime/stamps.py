"""Module fingerprints: the architecture and weights digests that go into a cache key and the per-call stamp.

The weights hash is a real content hash (sha256 over every parameter and buffer), memoized on the tensors'
identity and version counters so that the hot path only compares a tuple of integers.
"""

from __future__ import annotations

import hashlib
import inspect
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from monai_trt.cache.keys import digest

__all__ = ["architecture_fingerprint", "WeightsHasher"]


@lru_cache(maxsize=None)
def _class_source_hash(cls: type) -> str:
    """Hash of a class's source (so editing a network's code changes the key); its name when unreadable."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        source = f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def architecture_fingerprint(module: nn.Module) -> str:
    """Structure of `module`: its repr (layer hyper-parameters), tensor names/shapes/dtypes, and class sources."""
    tensors = [(n, list(t.shape), str(t.dtype)) for n, t in module.state_dict(keep_vars=True).items()]
    classes = sorted({f"{type(m).__module__}.{type(m).__qualname__}:{_class_source_hash(type(m))}"
                      for m in module.modules()})
    return digest({"repr": repr(module), "tensors": tensors, "classes": classes})


class WeightsHasher:
    """Content hash of a module's parameters and buffers, recomputed only when a tensor changed.

    The per-call check (:meth:`changed`) compares identity, storage pointer and in-place version counter of every
    parameter and buffer (`load_state_dict`, `copy_`, optimiser steps and `.to()` all change one of them); it
    costs ~30 us for SwinUNETR. The sha256 over the tensor bytes (~0.25 s for SwinUNETR on CPU) runs only then.
    """

    def __init__(self, module: nn.Module) -> None:
        self._module = module
        self._slots = [d for m in module.modules() for d in (m._parameters, m._buffers)]
        self._stamp: tuple[Any, ...] | None = None
        self._hash = ""

    def _current_stamp(self) -> tuple[Any, ...]:
        return tuple((id(t), t.data_ptr(), t._version) for d in self._slots for t in d.values() if t is not None)

    def changed(self) -> bool:
        """True when any tensor changed since the last :meth:`digest`."""
        return self._current_stamp() != self._stamp

    def digest(self) -> str:
        """sha256 over names, dtypes, shapes and bytes of the state_dict (memoized)."""
        stamp = self._current_stamp()
        if stamp != self._stamp:
            sha = hashlib.sha256()
            for name, tensor in self._module.state_dict(keep_vars=True).items():
                data = tensor.detach()
                sha.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
                if data.numel():
                    sha.update(data.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
            self._hash, self._stamp = sha.hexdigest(), stamp
        return self._hash
