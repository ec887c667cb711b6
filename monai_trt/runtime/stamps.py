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
from dataclasses import dataclass
from itertools import chain
from operator import is_
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from monai_trt.backends.cuda_graph import capture_cuda_graph
from monai_trt.runtime.fingerprint import (
    MODULE_BOOKKEEPING,
    architecture_fingerprint,
    fingerprint_module,
    plain_tensor_attributes,
)

__all__ = ["architecture_fingerprint", "weights_digest", "WeightsHasher", "ModuleState", "Stamp", "ContentCheck",
           "Pending", "Deferred", "IN_PLACE", "content_change"]

logger = logging.getLogger(__name__)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY = (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.bool)  # CPU tensors of these dtypes are checked through numpy


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
    """A cheap content check of many tensors: small ones byte for byte, large floating ones by two statistics.

    Contiguous tensors of up to :data:`EXACT_ELEMENTS` elements (most tensors of a network: biases, norms, small
    convolutions; integer and boolean index buffers of any size) are compared byte for byte with a copy. Larger
    floating tensors are summarised, reading every element: on CUDA by their L2 norm and maximum (one
    `torch._foreach_norm` and one `torch._foreach_max` per dtype, a few fused kernels; one transfer per device
    brings the result to the host); on CPU by their sum and maximum, in numpy (single-threaded: torch's parallel
    reductions stall for many times their cost while an engine's thread pool spins). This sees any change to a small
    tensor, and any change to a large one that moves its statistics — scaling, negating or replacing it, EMA updates,
    added noise, almost any single element — but not a permutation of its elements (nor, on CUDA, a sign flip of an
    element that is not its maximum).
    """

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        large: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        exact: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        self._cpu_large: list[np.ndarray] = []
        self._cpu_exact: list[np.ndarray] = []
        for tensor in tensors:
            data = tensor.detach()  # shares storage: sees `.data` writes until the storage itself is replaced
            if not data.numel() or data.device.type == "meta" or data.layout != torch.strided:
                continue
            if data.is_complex():
                data = torch.view_as_real(data)
            is_large = data.dtype in _FLOATS and (data.numel() > EXACT_ELEMENTS or not data.is_contiguous())
            if data.device.type == "cpu" and data.dtype in _NUMPY:
                (self._cpu_large if is_large else self._cpu_exact).append(data.numpy())  # shares memory too
            elif is_large:
                large[(data.device, data.dtype)].append(data)
            else:
                exact[data.device].append(data)
        self._large = list(large.values())
        self._exact = {device: _Bytes(group) for device, group in exact.items()}
        self._cpu_copy = _joined(self._cpu_exact)
        self._devices = list(dict.fromkeys([*(group[0].device for group in self._large), *self._exact]))
        self._launches = 0
        self._graphs: dict[torch.device, _GraphedCheck | None] = {}  # None: that device's check runs eagerly

    def launch(self) -> list[Pending]:
        """Start computing the check (asynchronously on CUDA): one int64 result per device, for :meth:`read`.

        On CUDA the result is copied to pinned host memory behind an event, so that reading it waits for the check's
        own kernels only, not for work the caller enqueues after it (an engine call). From the
        :data:`GRAPH_AFTER`-th launch on, a CUDA device's check kernels replay as one CUDA graph
        (:class:`_GraphedCheck`) instead of a dozen launches from Python."""
        self._launches += 1
        pending = []
        for device in self._devices:
            graphed = self._graphed(device) if device.type == "cuda" else None
            pending.append(graphed() if graphed is not None else _to_host(self._device_part(device)))
        if self._cpu_large or self._cpu_exact:
            stats = [float(v) for a in self._cpu_large for v in (a.sum(), a.max())]
            stats.append(float(_joined(self._cpu_exact) != self._cpu_copy))
            pending.append(_to_host(torch.tensor(stats, dtype=torch.float64).view(torch.int64)))
        return pending

    def _device_part(self, device: torch.device) -> torch.Tensor:
        """The check of one device's tensors, computed eagerly: statistics of the large ones, then whether any small
        one's bytes changed."""
        found = []
        for group in self._large:
            if group[0].device == device:
                norms = torch._foreach_norm(group, 2, dtype=torch.float32 if group[0].element_size() < 4 else None)
                stats = torch.stack([*norms, *torch._foreach_max(group)]).to(torch.float64)
                found.append(stats.view(torch.int64))
        exact = self._exact.get(device)
        if exact is not None:
            found.append(exact.changed().view(1).to(torch.int64))
        return torch.cat(found) if len(found) > 1 else found[0]

    def _graphed(self, device: torch.device) -> _GraphedCheck | None:
        if device not in self._graphs:
            if self._launches < GRAPH_AFTER:  # a stamp that lives a few calls only is not worth a capture
                return None
            self._graphs[device] = _GraphedCheck.capture(lambda: self._device_part(device), device)
        return self._graphs[device]

    def values(self) -> tuple[torch.Tensor, ...]:
        """The check's result on the host (compared bit for bit with an earlier one)."""
        return self.read(self.launch())

    @staticmethod
    def read(pending: list[Pending]) -> tuple[torch.Tensor, ...]:
        """The results of :meth:`launch`, waiting for each device's copy to arrive."""
        for _, event in pending:
            if event is not None:
                event.synchronize()
        return tuple(host for host, _ in pending)


Pending = tuple[torch.Tensor, "torch.cuda.Event | None"]  # a check result on (or on its way to) the host
GRAPH_AFTER = 3  # launches of one stamp's check before its CUDA part is captured as a graph


class _GraphedCheck:
    """One CUDA device's check kernels captured as a CUDA graph: each call replays it (one launch) and copies the
    result to the host.

    The graph reads the tensors at the addresses they had at capture; their stamp keeps them alive, and any storage
    swap shows in the stamp's data pointers, which :meth:`Stamp.changed` compares before it trusts a checksum.
    Replays of one graph are ordered one after the other (each waits for the previous one's copy), whichever stream
    the calling thread uses, so a copy never reads a result another thread's replay is overwriting.
    """

    def __init__(self, replay: Callable[[], None], result: torch.Tensor, device: torch.device) -> None:
        self._replay = replay
        self._result = result
        self._device = device
        self._lock = threading.Lock()
        self._done: torch.cuda.Event | None = None

    @classmethod
    def capture(cls, compute: Callable[[], torch.Tensor], device: torch.device) -> _GraphedCheck | None:
        """Capture `compute()`, replay it once and keep it only if the replay equals an eager run (else None: that
        device's check stays eager, with a debug line saying why)."""
        try:
            eager = compute()
            replay, (result,) = capture_cuda_graph(lambda: [compute()], None, device)
            with torch.cuda.device(device):
                replay()
            if not torch.equal(result, eager):
                logger.debug("the module check on %s stays eager: its graph replay differs from an eager run", device)
                return None
        except Exception as err:  # noqa: BLE001 - an optimisation: the eager check is always there
            logger.debug("the module check on %s stays eager: capture failed (%s: %s)", device, type(err).__name__, err)
            return None
        return cls(replay, result, device)

    def __call__(self) -> Pending:
        with self._lock, torch.cuda.device(self._device):
            stream = torch.cuda.current_stream(self._device)
            if self._done is not None:
                stream.wait_event(self._done)
            self._replay()
            host, self._done = _to_host(self._result)
        return host, self._done


def _to_host(part: torch.Tensor) -> Pending:
    if part.device.type != "cuda":
        return part, None
    host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
    host.copy_(part, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(part.device))
    return host, event


def _joined(arrays: list[np.ndarray]) -> bytes:
    """The bytes of CPU arrays, one after the other (a single-threaded copy)."""
    return b"".join(a.reshape(-1).view(np.uint8) if a.flags.c_contiguous else a.tobytes() for a in arrays)


EXACT_ELEMENTS = 65536  # SwinUNETR 48: 115 of its 159 tensors, 1.0 M of its 63 M elements (a 4 MB copy)


class _Bytes:
    """Tensors on one device compared byte for byte (as int64 words) with a copy taken when the stamp was made."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        # flat byte views of contiguous tensors are made once; others are flattened (copied) on each check
        self._views = [t.view(-1).view(torch.uint8) for t in tensors if t.is_contiguous()]
        self._others = [t for t in tensors if not t.is_contiguous()]
        size = sum(t.numel() * t.element_size() for t in tensors)
        self._views.append(torch.zeros(-size % 8, dtype=torch.uint8, device=tensors[0].device))  # to whole words
        self._copy = self._words().clone()

    def _words(self) -> torch.Tensor:
        return torch.cat([*self._views, *(t.reshape(-1).view(torch.uint8) for t in self._others)]).view(torch.int64)

    def changed(self) -> torch.Tensor:
        return (self._words() != self._copy).any()


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


def _values(modules: list[nn.Module], tables: list[dict[str, Any]]) -> tuple[Any, ...]:
    """The layout compared by value where a new object may carry the same meaning (:func:`_freeze`); each module's
    attribute dict by identity (its values follow it in the layout)."""
    return (*map(id, map(vars, modules)), *map(_freeze, chain.from_iterable(map(dict.values, tables))))


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
        self._values = _values(self._modules, self._tables)
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
            if _values(self._modules, tables) != self._values:
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
