"""The module fingerprints that go into a cache key, and the per-call check that they still describe the module.

- :func:`architecture_fingerprint` (:mod:`.fingerprint`): everything except the weights' values.
- :func:`weights_digest`: sha256 over every parameter and buffer, persistent or not.
- :class:`ModuleState`: both digests, kept current by a per-call :class:`Stamp` that sees structure and attribute
  changes (the identity of every submodule, attribute value, parameter and buffer; hooks), in-place updates (version
  counters, storage pointers) and — through a content checksum — writes that bypass the version counter
  (`.data`, numpy views). When the stamp changes, both digests are recomputed; :meth:`ModuleState.refresh` forces
  that on the next call. What the checksum can miss is in the README ("What is detected").
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from monai_trt.runtime.fingerprint import (
    MODULE_BOOKKEEPING,
    architecture_fingerprint,
    fingerprint_module,
    plain_tensor_attributes,
)

__all__ = ["architecture_fingerprint", "weights_digest", "WeightsHasher", "ModuleState", "Stamp", "ContentCheck"]

logger = logging.getLogger(__name__)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer (tied and non-persistent ones too), by name."""
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def weights_digest(module: nn.Module) -> str:
    """sha256 over the name, dtype, shape and bytes of every parameter and buffer (non-persistent ones too)."""
    sha = hashlib.sha256()
    first: dict[int, str] = {}
    for name, tensor in _named_tensors(module):
        data = tensor.detach()
        sha.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        tied = first.setdefault(id(tensor), name)
        if tied != name:
            sha.update(f"tied:{tied};".encode())
        elif data.numel() and data.device.type != "meta" and data.layout == torch.strided:
            sha.update(data.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return sha.hexdigest()


class WeightsHasher:
    """The weights digest of a module (kept for callers that hash a module once, e.g. `monai_trt verify`)."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def digest(self) -> str:
        return weights_digest(self._module)


class ContentCheck:
    """A cheap content checksum of many tensors: L2 norm and maximum of every floating tensor, exact copies of the rest.

    Per device and dtype one `torch._foreach_norm` and one `torch._foreach_max` (a few fused kernels on CUDA) read
    every element; integer and boolean tensors (index buffers) are compared byte for byte with a copy. The result is
    copied to the host in one transfer. It sees every write that changes a tensor's norm (at the tensor's precision)
    or maximum — scaling, negating or replacing a whole tensor, EMA updates, added noise, almost any single element —
    but not permutations of elements, nor a sign flip of an element that is not the maximum and keeps the norm.
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        exact: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for tensor in tensors:
            data = tensor.detach()  # shares storage: sees `.data` writes until the storage itself is replaced
            if not data.numel() or data.device.type == "meta" or data.layout != torch.strided:
                continue
            if data.is_complex():
                data = torch.view_as_real(data)
            if data.dtype in _FLOATS:
                groups[(data.device, data.dtype)].append(data)
            else:
                exact[data.device].append(data)
        self._groups = list(groups.values())
        self._exact = {device: (group, _bytes(group).clone()) for device, group in exact.items()}

    def values(self) -> torch.Tensor | None:
        """The checksum (compared bit for bit; None when there is nothing to check)."""
        parts: list[torch.Tensor] = []
        for group in self._groups:
            norms = torch._foreach_norm(group, 2, dtype=torch.float32 if group[0].element_size() < 4 else None)
            maxes = torch._foreach_max(group)
            parts.append(torch.stack([*norms, *maxes]).to(torch.float64).view(torch.int64).cpu())
        for group, reference in self._exact.values():
            parts.append((_bytes(group) != reference).any().view(1).to(torch.int64).cpu())
        return torch.cat(parts) if parts else None


def _bytes(group: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).contiguous().view(torch.uint8) for t in group])


def _tree(modules: list[nn.Module]) -> tuple[tuple[Any, ...], ...]:
    """Per module: its attribute values, children, parameters and buffers, and forward hook handles."""
    return tuple(
        (*m.__dict__.values(), *m._modules.values(), *m._parameters.values(), *m._buffers.values(),
         *m._forward_hooks, *m._forward_pre_hooks)
        for m in modules
    )


def _ids(tree: tuple[tuple[Any, ...], ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(map(id, values)) for values in tree)


def _values(tree: tuple[tuple[Any, ...], ...]) -> tuple[tuple[Any, ...], ...]:
    return tuple(tuple(map(_freeze, values)) for values in tree)


def _freeze(value: Any) -> Any:
    """A comparable copy of a mutable container attribute (compared by value: in-place edits keep its identity)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, set)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value if isinstance(value, (type(None), bool, int, float, str)) else id(value)


class Stamp:
    """What the per-call check compares: a snapshot of the module tree, tensor identities/versions and checksum."""

    def __init__(self, module: nn.Module) -> None:
        self._modules = list(module.modules())
        self._tree = _tree(self._modules)  # keeps every value alive, so that no id is reused while compared
        self._tree_ids = _ids(self._tree)
        self._values = _values(self._tree)
        self._containers = [
            (m.__dict__, name, _freeze(value)) for m in self._modules for name, value in m.__dict__.items()
            if name not in MODULE_BOOKKEEPING and isinstance(value, (list, dict, set))
        ]
        self._global_hooks = self._hooks()
        unique = {id(t): t for m in self._modules for d in (m._parameters, m._buffers) for t in d.values()
                  if t is not None}
        unique.update({id(t): t for t in plain_tensor_attributes(module)})
        self._tensors = [t for t in unique.values() if t.layout == torch.strided]
        self._versioned = [t for t in self._tensors if not t.is_inference()]  # inference tensors have no counter
        self._versions = self._tensor_versions()
        self._content = ContentCheck(self._tensors)
        self._checksum = self._content.values()

    @staticmethod
    def _hooks() -> tuple[int, ...]:
        return (*_torch_module._global_forward_pre_hooks, *_torch_module._global_forward_hooks)

    def _tensor_versions(self) -> tuple[Any, ...]:
        return (tuple(t.data_ptr() for t in self._tensors), tuple(t._version for t in self._versioned))

    def changed(self) -> str | None:
        """Why the module no longer matches this stamp (None: it does). Costs are in the README."""
        ids = _ids(_tree(self._modules))
        if ids != self._tree_ids:
            tree = _tree(self._modules)
            if _values(tree) != self._values:
                return "structure or attributes"
            self._tree, self._tree_ids = tree, ids  # equal values in new objects (torch.export copies tuples)
        if self._hooks() != self._global_hooks:
            return "global hooks"
        if any(_freeze(attrs.get(name)) != frozen for attrs, name, frozen in self._containers):
            return "attribute contents"
        if self._tensor_versions() != self._versions:
            return "tensors updated in place"
        checksum = self._content.values()
        if checksum is not None and not torch.equal(checksum, self._checksum):
            return "tensor contents (a write that bypassed the version counter)"
        return None


class ModuleState:
    """The (architecture, weights) digests of a module as it is now, checked on every call.

    :attr:`versions` holds the versions of Python and of the libraries the module's code reaches (for the key).

    Args:
        module: the wrapped module.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._digests = ("", "")
        self._full = True
        self.versions: dict[str, str] = {}

    def refresh(self) -> None:
        """Re-fingerprint and re-hash everything on the next :meth:`current`, whatever the stamp says."""
        self._full = True

    def current(self) -> tuple[str, str]:
        """(architecture, weights) digests of the module now; recomputed only when the per-call stamp changed."""
        stamp = self._stamp
        if stamp is not None and not self._full:
            why = stamp.changed()
            if why is None:
                return self._digests
        else:
            why = "refresh" if stamp is not None else None
        with self._lock:
            if self._stamp is not stamp:  # another thread has just recomputed
                return self._digests
            start = time.perf_counter()
            self._full = False
            new = Stamp(self.module)  # before hashing: a change during hashing shows on the next call
            architecture, self.versions = fingerprint_module(self.module)
            self._digests = (architecture, weights_digest(self.module))
            self._stamp = new
            if why is not None:
                logger.info("%s changed (%s): fingerprints recomputed in %.2f s",
                            type(self.module).__name__, why, time.perf_counter() - start)
            return self._digests
