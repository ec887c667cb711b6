"""The module fingerprints that go into a cache key, and the per-call check that they still describe the module.

- :func:`architecture_fingerprint` (:mod:`.fingerprint`): everything except the weights' values.
- :func:`weights_digest`: sha256 over every parameter and buffer, persistent or not.
- :class:`ModuleState`: both digests, kept current by a per-call :class:`Stamp` that sees structure and attribute
  changes (the identity of every submodule, attribute value, parameter and buffer; hooks), in-place updates (version
  counters, storage pointers) and — through a content checksum (:mod:`.content_check`) — writes that bypass the
  version counter (`.data`, numpy views). When the stamp changes, both digests are recomputed;
  :meth:`ModuleState.refresh` forces that on the next call. What the checksum can miss is in the README ("What is
  detected").
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from itertools import chain
from operator import is_
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from monai_trt.runtime.content_check import ContentCheck, Pending
from monai_trt.runtime.fingerprint import (
    MODULE_BOOKKEEPING,
    architecture_fingerprint,
    fingerprint_module,
    plain_tensor_attributes,
)

__all__ = ["architecture_fingerprint", "weights_digest", "WeightsHasher", "ModuleState", "Stamp", "Deferred",
           "IN_PLACE", "content_change"]

logger = logging.getLogger(__name__)
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


def _tables(modules: list[nn.Module]) -> list[dict[str, Any]]:
    """Per module, the dicts the per-call walk reads: attributes, children, parameters, buffers, forward hooks."""
    return [t for m in modules for t in (m.__dict__, m._modules, m._parameters, m._buffers, m._forward_hooks,
                                          m._forward_pre_hooks)]


def _layout(modules: list[nn.Module], tables: list[dict[str, Any]]) -> list[Any]:
    """What the per-call walk compares by identity: each module's attribute dict, then every value of every table
    (one flat list: the walk runs in C, about twice as fast as per-module tuples of ids)."""
    return [*map(vars, modules), *chain.from_iterable(map(dict.values, tables))]


def _same(new: list[Any], old: list[Any]) -> bool:
    return len(new) == len(old) and all(map(is_, new, old))


def _values(layout: list[Any], modules: int) -> tuple[Any, ...]:
    """A layout compared by value where a new object may carry the same meaning (:func:`_freeze`); its first
    `modules` entries, the modules' attribute dicts, by identity (their values follow them in the layout)."""
    return (*map(id, layout[:modules]), *map(_freeze, layout[modules:]))


def _freeze(value: Any) -> Any:
    """A comparable copy of a mutable container attribute (compared by value: in-place edits keep its identity)."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, set)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    if isinstance(value, tuple):
        return tuple(_freeze(v) for v in value)
    return value if isinstance(value, (type(None), bool, int, float, str)) else id(value)


IN_PLACE = "tensors updated in place"  # what Stamp.changed says for an update the version counters saw


class Stamp:
    """What the per-call check compares: a snapshot of the module tree, tensor identities/versions and checksum."""

    def __init__(self, module: nn.Module) -> None:
        self._modules = list(module.modules())
        self._tables = _tables(self._modules)
        self._layout = _layout(self._modules, self._tables)  # keeps every value alive: identities stay meaningful
        self._sizes = list(map(len, self._tables))
        self._values = _values(self._layout, len(self._modules))
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

    def changed(self, deferred: list[Deferred] | None = None, walk_later: bool = False) -> str | None:
        """Why the module no longer matches this stamp (None: it does). Costs are in the README.

        With `deferred`, the content checksum is not awaited: a :class:`Deferred` is appended, which the caller must
        consult (:func:`content_change`) before it uses what it computed meanwhile. With `walk_later` too, the walk
        of the module tree waits for that as well (so it overlaps the caller's GPU work): only a caller that discards
        what it computed on any change, and recomputes everything, may ask for that."""
        if not walk_later or deferred is None:
            why = self._walk()
            if why is not None:
                return why
        if self._tensor_versions() != self._versions:
            return IN_PLACE
        pending = self._content.launch()  # after the data pointers: a checksum of swapped storages means nothing
        if deferred is not None:
            deferred.append(Deferred(self, pending, walk_later))
            return None
        return self.content_changed(pending)

    def _walk(self) -> str | None:
        """Why the module tree, its attributes or the global hooks no longer match (None: they do)."""
        if not _same(_layout(self._modules, self._tables), self._layout) or \
                list(map(len, self._tables)) != self._sizes:
            tables = _tables(self._modules)
            layout = _layout(self._modules, tables)
            if _values(layout, len(self._modules)) != self._values:
                return "structure or attributes"
            # equal values in new objects (torch.export copies tuples): compared by identity from now on
            self._tables, self._layout, self._sizes = tables, layout, list(map(len, tables))
        if self._hooks() != self._global_hooks:
            return "global hooks"
        if any(_freeze(attrs.get(name)) != frozen for attrs, name, frozen in self._containers):
            return "attribute contents"
        return None

    def content_changed(self, pending: list[Pending]) -> str | None:
        """Why the checksum launched by :meth:`changed` differs from this stamp's (None: it does not)."""
        checksum = self._content.read(pending)
        if not all(torch.equal(new, old) for new, old in zip(checksum, self._checksum)):
            return "tensor contents (a write that bypassed the version counter)"
        return None


@dataclass(frozen=True)
class Deferred:
    """The rest of a per-call check that :meth:`Stamp.changed` left for after the caller's GPU work was enqueued:
    reading the content checksum, and (`walk`) the walk of the module tree."""

    stamp: Stamp
    pending: list[Pending]
    walk: bool

    def why(self) -> str | None:
        """Why the module had changed (None: it had not)."""
        why = self.stamp._walk() if self.walk else None
        return why or self.stamp.content_changed(self.pending)


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
        self._why: str | None = None  # why the next call recomputes (a change `confirm` found)
        self.versions: dict[str, str] = {}

    def refresh(self) -> None:
        """Re-fingerprint and re-hash everything on the next :meth:`current`, whatever the stamp says."""
        self._full = True

    def current(self, deferred: list[Deferred] | None = None, checked: bool = False
                ) -> tuple[str, str]:
        """(architecture, weights) digests of the module now; recomputed only when the per-call stamp changed.

        `checked`: the caller vouches that the module is as it was when these digests were last computed (it has
        just compared it with its own stamp, or it is a private copy only the caller changes, and the caller calls
        :meth:`refresh` whenever it does): the stamp is not compared again; a pending refresh still recomputes.

        With `deferred` (a list, filled here), the digests returned are provisional until :meth:`confirm` says the
        content checksum and the walk of the module tree agreed: the caller may enqueue GPU work meanwhile, but must
        not use its result before confirming, and must discard it and call again when they did not. This keeps the
        per-call check from draining the CUDA queue before every engine call, and overlaps the walk with that
        work."""
        stamp = self._stamp
        if stamp is not None and not self._full:
            if checked:
                return self._digests
            why = stamp.changed(deferred, walk_later=True)
            if why is None:
                return self._digests
        else:
            why = (self._why or "refresh") if stamp is not None else None
            self._why = None
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

    def confirm(self, deferred: list[Deferred]) -> bool:
        """Whether the digests :meth:`current` returned with `deferred` were right. False: the module had changed
        (its tree, attributes or tensor contents); whatever was computed with those digests must be discarded, and
        the next :meth:`current` recomputes them."""
        found = content_change(deferred)
        if found is None:
            return True
        stamp, why = found
        with self._lock:
            if self._stamp is stamp:
                self._full, self._why = True, why
        return False


def content_change(deferred: list[Deferred]) -> tuple[Stamp, str] | None:
    """The first stamp whose deferred check (from :meth:`Stamp.changed`) found a change, and why."""
    for check in deferred:
        why = check.why()
        if why is not None:
            return check.stamp, why
    return None
