"""Split a wrapper's calls across devices: one engine replica per device, dim 0 of each call split between them.

An entry with `devices` gives its :class:`~monai_trt.runtime.wrapper.EngineWrapper` a :class:`ReplicaSet`. Each
call's batch (dim 0 of the first tensor input, and of every tensor input with the same dim 0; other inputs go whole
to every replica) is cut into contiguous, near-equal shares in device order; each replica answers its share; the
outputs are moved to the caller's device and concatenated in input order.

Replicas:
- On the wrapped module's own device the share goes through the owning wrapper itself (its engines, its fallback);
  a thread-local flag makes that nested call take the plain path.
- On every other device: a deep copy of the unwrapped module moved there, served by its own wrapper (built by the
  owner's class, with the same entry but no `devices`), so key → lookup/build → load → refit → validate, fallback
  and staleness apply per replica. The key has no device index: every replica loads the same cache entry.
  Copies follow the original: each split call checks it with a :class:`~monai_trt.runtime.stamps.Stamp`, as the
  plain path checks its module. In-place tensor updates are copied into the copies (their wrappers then refit or
  re-key as for any weights change); changed structure or attributes, or names/shapes/dtypes, make them again; a
  content change behind the version counters (read after the shares are queued) updates the copies and answers
  the call again. One check per call: the owner's own share skips its own check of the original when this one found
  nothing (the set vouches for it, :meth:`ReplicaSet.vouches_for`), and the copies' wrappers never check their
  private modules (the set refreshes their fingerprints whenever it changes them).

Threads and streams: the caller's thread first queues the copies of the other shares' inputs (on its current
stream, ahead of its own work), then hands each share to its replica's worker thread (one per device, so one
device's launches never wait for another's) and answers the own-device share itself meanwhile. Workers enter the
caller's grad mode, inference mode and autocast state (per device type; all thread-local in PyTorch) and the
caller's current stream for the caller's device, so the outputs' copies back are ordered before the caller's later
work on that stream; no host synchronisation is added. The first call of a set runs its shares one after another
(the first replica builds or loads the engine, the others then load the same entry).

Failure: an engine failure on a replica is that replica wrapper's fallback (PyTorch on that device for its shares,
or raise with `fallback: false`). An exception escaping a replica (e.g. the device itself fails) recomputes that
share in PyTorch on the caller's device, with one warning, and later calls leave that device out. Outputs that are
not batched along dim 0 make the set stop splitting (one warning; the call is recomputed whole).

Counters: `wrapper.calls` counts shares (a call split in two adds two), `ReplicaSet.calls` the same per device.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from monai_trt.errors import BackendUnavailable, EngineBuildError
from monai_trt.patch import PatchEntry
from monai_trt.runtime.fingerprint import plain_tensor_attributes
from monai_trt.runtime.stamps import IN_PLACE, Deferred, Stamp, content_change
from monai_trt.runtime.validate import compare_outputs

__all__ = ["ReplicaSet", "plan_devices", "split_sizes", "CallerState", "module_device"]

logger = logging.getLogger(__name__)
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(cause: str, msg: str, *args: Any) -> None:
    with _WARNED_LOCK:
        if cause in _WARNED:
            return
        _WARNED.add(cause)
    logger.warning(msg, *args)


def plan_devices(spec: PatchEntry, label: str | None = None) -> list[torch.device] | None:
    """The devices `spec.devices` names that exist here, in order; None: calls are not split.

    "all" is every visible CUDA device (none: not split, no warning). Listed CUDA devices that do not exist are left
    out with one warning, or raise with `fallback: false`.

    Raises:
        BackendUnavailable: a listed CUDA device does not exist here and the entry has `fallback: false`.
    """
    if spec.devices is None:
        return None
    label = label or spec.describe()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec.devices == "all":
        if count == 0:
            logger.info("%s: devices 'all': no CUDA device here, calls are not split", label)
            return None
        return [torch.device("cuda", i) for i in range(count)]
    wanted = [torch.device(d) for d in spec.devices]
    present = [d for d in wanted if d.type == "cpu" or d.index < count]
    if len(present) < len(wanted):
        missing = [str(d) for d in wanted if d not in present]
        message = f"{label}: devices {missing} do not exist here ({count} CUDA device(s) visible)"
        if not spec.fallback:
            raise BackendUnavailable(message)
        _warn_once(f"devices:{label}:{missing}", "%s; %s", message,
                   f"using {[str(d) for d in present]}" if present else "calls are not split")
    return present or None


@dataclasses.dataclass(frozen=True)
class CallerState:
    """The caller thread's thread-local modes, re-entered by the worker threads that serve its shares."""

    grad: bool
    inference: bool
    autocast: tuple[tuple[str, torch.dtype], ...]
    stream: Any  # the caller's current CUDA stream on the caller's device, or None

    @classmethod
    def capture(cls, device: torch.device) -> CallerState:
        autocast = tuple((kind, torch.get_autocast_dtype(kind)) for kind in ("cpu", "cuda")
                         if torch.is_autocast_enabled(kind))
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, stream)

    @contextlib.contextmanager
    def enter(self, device: torch.device) -> Iterator[None]:
        """The caller's modes in this thread, with `device` current (CUDA)."""
        with contextlib.ExitStack() as stack:
            if self.inference:
                stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for kind, dtype in self.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype))
            if self.stream is not None:
                stack.enter_context(torch.cuda.stream(self.stream))
            if device.type == "cuda":
                stack.enter_context(torch.cuda.device(device))
            yield


class _Replica:
    """One device's server: the owner (own device) or a wrapper of a private copy in a worker thread."""

    def __init__(self, device: torch.device, serve: Callable[..., Any], module: nn.Module | None) -> None:
        self.device = device
        self.serve = serve
        self.module = module  # the copy (None for the owner's own device)
        self.failed: str | None = None
        self.checked = module is None  # a copy's first engine answer is compared with PyTorch on its device
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def own(self) -> bool:
        return self.module is None

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"monai_trt-{self.device}")
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


class ReplicaSet:
    """The per-device replicas of one wrapper and the split/gather of its calls (see the module docstring).

    Args:
        owner: the wrapper (installed as the module's forward) whose calls are split; it must have `module`,
            `spec`, `original` and `calls`, and answer calls itself.
        factory: builds the wrapper of a copy: `factory(module, spec)` (the owner's class).
        devices: where the replicas live, in share order (from :func:`plan_devices`).

    Attributes:
        calls: shares served per device, `{"cuda:1": {"engine": n, "pytorch": m}}`.
        unsplit: why calls are no longer split (None while they are).
    """

    def __init__(self, owner: Any, factory: Callable[[nn.Module, PatchEntry], Any], devices: list[torch.device]):
        self.owner = owner
        self.factory = factory
        self.devices = devices
        self.calls: dict[str, dict[str, int]] = {}
        self.unsplit: str | None = None
        self._replicas: list[_Replica] | None = None  # made on the first call: weights arrive after apply()
        self._own_device: torch.device | None = None
        self._original: Stamp | None = None  # the original as the copies were last made or synced from it
        self._local = threading.local()
        self._lock = threading.Lock()
        self._warm = False

    @classmethod
    def create(cls, owner: Any, factory: Callable[[nn.Module, PatchEntry], Any]) -> ReplicaSet | None:
        """The owner's replica set, or None when its entry splits nothing here."""
        devices = plan_devices(owner.spec, getattr(owner, "label", None))
        return cls(owner, factory, devices) if devices else None

    @property
    def label(self) -> str:
        return getattr(self.owner, "label", None) or self.owner.spec.describe()

    def active(self) -> bool:
        """False inside the owner's own share (its nested call takes the plain path) and once splitting stopped."""
        return self.unsplit is None and not getattr(self._local, "inside", False)

    @property
    def builds(self) -> int:
        """Engines built in this process by the owner and every copy's wrapper."""
        copies = [r.serve for r in self._replicas or () if not r.own]
        return self.owner.engine_set.builds + sum(w.engine_set.builds for w in copies)

    def replicas(self) -> list[tuple[torch.device, Any]]:
        """(device, the wrapper serving it) in share order; the owner serves its module's own device."""
        return [(r.device, r.serve) for r in self._replicas or ()]

    # ------------------------------------------------------------------ the call
    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:  # one split call at a time: replicas and their copies are not shared between calls
            return self._split_call(args, kwargs)

    def _split_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], retry: bool = True) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        first = next((t for t in leaves if isinstance(t, torch.Tensor) and t.dim() >= 1), None)
        deferred: list[Deferred] = []  # the original's content check, read after the shares
        replicas, unchanged = self._ready(deferred) if first is not None else ([], False)
        replicas = [r for r in replicas if r.failed is None]
        if first is None or first.shape[0] == 0 or not replicas:
            return self._own_call(args, kwargs, None)
        batch, caller = first.shape[0], first.device
        sizes = split_sizes(batch, len(replicas))
        count = len(sizes)
        if count == 1 and replicas[0].own:  # one share, on the caller's side: the plain path
            return self._checked_own_call(args, kwargs, replicas[0], unchanged, deferred)
        shares, start = [], 0
        for size in sizes:
            cut = [t.narrow(0, start, size) if _batched(t, batch) else t for t in leaves]
            shares.append(pytree.tree_unflatten(cut, spec))
            start += size
        state = CallerState.capture(caller)
        # inputs leave the caller's device first, from this thread: their copies are queued on the caller's stream
        # ahead of the own share's kernels, so the other devices never wait for those
        moved: dict[int, Any] = {}
        futures: dict[int, concurrent.futures.Future] = {}
        for i in range(count):
            if not replicas[i].own:
                try:
                    moved[i] = pytree.tree_map_only(torch.Tensor, lambda t, d=replicas[i].device: t.to(d), shares[i])
                except Exception as err:  # the device failed already: handled as the replica failing, below
                    futures[i] = concurrent.futures.Future()
                    futures[i].set_exception(err)
        results: dict[int, Any] = {}
        try:
            if self._warm:  # the other devices start first; the caller's device works meanwhile, in this thread
                for i in moved:
                    futures[i] = replicas[i].submit(self._serve_copy, replicas[i], moved[i], state, caller)
                for i in range(count):
                    if replicas[i].own:
                        results[i] = self._own_call(*shares[i], replicas[i], vouch=unchanged)
            else:  # the first call runs the shares one after another: one replica builds, the others then load
                for i in range(count):
                    if replicas[i].own:
                        results[i] = self._own_call(*shares[i], replicas[i], vouch=unchanged)
                    elif i in moved:
                        futures[i] = replicas[i].submit(self._serve_copy, replicas[i], moved[i], state, caller)
                        concurrent.futures.wait([futures[i]])
        finally:
            if futures:
                concurrent.futures.wait(futures.values())
        self._warm = True
        for i, future in sorted(futures.items()):
            results[i] = self._collect(replicas[i], future, shares[i], caller)
        changed = content_change(deferred)
        if changed is not None:  # the copies (and the own share, vouched for) answered with the old weights
            self._sync(changed[1])
            if retry:
                return self._split_call(args, kwargs, retry=False)
            return self._own_call(args, kwargs, None)  # changing under every call: the original answers alone
        outputs = [results[i] for i in range(count)]
        if count == 1:
            return outputs[0]
        gathered, why = _gather(outputs, sizes)
        if why is None:
            return gathered
        self.unsplit = why
        _warn_once(f"unsplit:{id(self)}", "%s: %s; calls are no longer split across devices",
                   self.label, why)
        return self._own_call(args, kwargs, None)

    def _checked_own_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], replica: _Replica, unchanged: bool,
                          deferred: list[Deferred]) -> Any:
        """The whole call on the owner's side, vouched for by this call's check when it found nothing so far; its
        deferred content check is read before the answer is used."""
        result = self._own_call(args, kwargs, replica, vouch=unchanged)
        changed = content_change(deferred)
        if changed is None:
            return result
        self._sync(changed[1])
        return self._own_call(args, kwargs, replica)

    def _own_call(self, args: tuple[Any, ...], kwargs: dict[str, Any], replica: _Replica | None,
                  vouch: bool = False) -> Any:
        """The owner answers (a share of) the call in this thread, on the plain path. `vouch`: this call's check of
        the original found it unchanged, so the owner's own per-call check is skipped (:meth:`vouches_for`)."""
        before = dict(self.owner.calls)
        self._local.inside, self._local.vouched = True, vouch
        try:
            return self.owner(*args, **kwargs)
        finally:
            self._local.inside, self._local.vouched = False, False
            if replica is not None:
                self._count(replica, {k: self.owner.calls[k] - before.get(k, 0) for k in before}, add=False)

    def _serve_copy(self, replica: _Replica, share: Any, state: CallerState, caller: torch.device) -> Any:
        """A worker thread: answer the share (already on the replica's device), move the outputs to the caller's."""
        with state.enter(replica.device):
            args, kwargs = share
            before = dict(replica.serve.calls)
            outputs = replica.serve(*args, **kwargs)
            served = {k: replica.serve.calls[k] - before.get(k, 0) for k in before}
            if not replica.checked and served.get("engine"):
                outputs, served = self._check_copy(replica, args, kwargs, outputs, served)
            return pytree.tree_map_only(torch.Tensor, lambda t: t.to(caller), outputs), served

    def _check_copy(self, replica: _Replica, args: Any, kwargs: Any, outputs: Any, served: dict[str, int]
                    ) -> tuple[Any, dict[str, int]]:
        """A copy's first engine answer against PyTorch on its device, whatever the cache remembers of earlier
        validations (they are per GPU model, not per device). Disagreement: that copy runs PyTorch from now on."""
        spec = self.owner.spec
        if not spec.validate:
            replica.checked = True
            return outputs, served
        with torch.no_grad():
            reference = replica.serve.original(*args, **kwargs)
        got, _ = pytree.tree_flatten(outputs)
        want, _ = pytree.tree_flatten(reference)
        error = compare_outputs(got, want, spec.precision, spec.tolerance)
        replica.checked = True
        if not error:
            return outputs, served
        message = f"the engine replica on {replica.device} disagrees with PyTorch: {error}"
        if not spec.fallback:
            raise EngineBuildError(message)
        replica.serve.disabled = message
        replica.serve.calls["engine"] -= 1  # its answer was not used
        replica.serve.calls["pytorch"] += 1
        _warn_once(f"check:{id(replica)}", "%s: %s; that device's shares run in PyTorch", self.label, message)
        return reference, {"pytorch": 1}

    def _collect(self, replica: _Replica, future: concurrent.futures.Future, share: Any, caller: torch.device) -> Any:
        """A copy's outputs; when it raised: the share in PyTorch on the caller's device (or raise)."""
        try:
            outputs, served = future.result()
        except Exception as err:
            if not self.owner.spec.fallback:
                raise
            args, kwargs = share
            outputs = self.owner.original(*args, **kwargs)  # PyTorch rejecting the inputs raises here: caller's error
            replica.failed = f"{type(err).__name__}: {err}"
            _warn_once(f"replica:{id(replica)}", "%s: the replica on %s failed (%s); its share ran in PyTorch on %s "
                       "and later calls leave %s out", self.label, replica.device, replica.failed,
                       caller, replica.device)
            served = {"pytorch": 1}
        self._count(replica, served, add=True)
        return outputs

    def _count(self, replica: _Replica, served: dict[str, int], add: bool) -> None:
        per_device = self.calls.setdefault(str(replica.device), {"engine": 0, "pytorch": 0})
        for kind, n in served.items():
            per_device[kind] = per_device.get(kind, 0) + n
            if add:
                self.owner.calls[kind] = self.owner.calls.get(kind, 0) + n

    def vouches_for(self, wrapper: Any) -> bool:
        """Whether `wrapper` may skip its per-call check of its module: always for a copy's wrapper (the copy is
        private; :meth:`_sync` and :meth:`_ready` refresh its fingerprints when they change it); for the owner, only
        inside its own share of a call whose check of the original found no change (a content change found later
        makes the call answer again, with the owner refreshed)."""
        if wrapper is self.owner:
            return getattr(self._local, "vouched", False)
        return any(r.serve is wrapper for r in self._replicas or ())

    # ------------------------------------------------------------------ replicas and their weights
    def _ready(self, deferred: list[Deferred]) -> tuple[list[_Replica], bool]:
        """The replicas, made on the first call, with the copies brought up to the original's weights and mode; and
        whether the original was found unchanged (so far: its content check may be pending in `deferred`).

        The original is checked as the owner's wrapper checks its module on every call (:class:`Stamp`): changed
        structure or attributes make the copies again, in-place updates copy the tensors over; a write behind the
        version counters shows in the content check, which goes to `deferred` (read once the shares are queued)."""
        device = module_device(self.owner.module)
        unchanged = False
        if self._replicas is None or device != self._own_device:
            self._make(device)
        elif self._original is not None:
            why = self._original.changed(deferred)
            unchanged = why is None
            if why == IN_PLACE:
                self._sync(why)
            elif why is not None:
                logger.info("%s: the module changed (%s); its copies are made again", self.label, why)
                self._make(device)
        training = self.owner.module.training
        for replica in self._replicas:
            if replica.module is not None and replica.module.training != training:
                replica.module.train(training)
                replica.serve.engine_set.refresh()
        return self._replicas, unchanged

    def _make(self, own_device: torch.device) -> None:
        self.close()
        self._own_device = own_device
        replicas, own_taken = [], False
        for device in self.devices:
            if device == own_device and not own_taken:
                replicas.append(_Replica(device, self.owner, None))
                own_taken = True
            else:
                replicas.append(self._copy(device))
        self._replicas, self._warm = replicas, False
        copies = any(not r.own for r in replicas)
        self._original = Stamp(self.owner.module) if copies else None

    def _copy(self, device: torch.device) -> _Replica:
        """A private copy of the unwrapped module on `device`, and the wrapper that serves it."""
        module = self.owner.module
        memo: dict[int, Any] = {id(self.owner): _NO_FORWARD}
        with torch.inference_mode(False):  # the caller's inference mode would make the copy's tensors inference tensors
            clone = copy.deepcopy(module, memo).to(device)
        if clone.__dict__.get("forward") is _NO_FORWARD:
            previous = self.owner.previous_forward
            if previous is None:
                del clone.__dict__["forward"]
            else:  # a forward installed on the instance before monai_trt: bound to the copy
                clone.__dict__["forward"] = copy.deepcopy(previous, memo)
        wrapper = self.factory(clone, dataclasses.replace(self.owner.spec, devices=None))
        wrapper.checked_by = self  # the copy changes only through this set (see vouches_for)
        for holder in (wrapper, getattr(wrapper, "engine_set", None)):
            if holder is not None and isinstance(getattr(holder, "label", None), str):
                holder.label = f"{holder.label} on {device}"
        usage, owner_usage = getattr(wrapper, "usage", None), getattr(self.owner, "usage", None)
        if usage is not None and owner_usage is not None:  # never installed: its calls count as the owner's
            usage.installed = 0
            wrapper.usage = owner_usage
        return _Replica(device, wrapper, clone)

    def _sync(self, why: str) -> None:
        """The original's tensors changed: copy every parameter and buffer (non-persistent ones too) into every copy;
        make a copy again when names/shapes/dtypes differ, or when the original holds tensors as plain attributes
        (they have no name to copy by)."""
        source = _tensors(self.owner.module)
        remake = any(True for _ in plain_tensor_attributes(self.owner.module))
        for index, replica in enumerate(self._replicas):
            if replica.own:
                continue
            target = _tensors(replica.module)
            if remake or list(source) != list(target) or any(
                    source[n].shape != target[n].shape or source[n].dtype != target[n].dtype for n in source):
                replica.close()
                self._replicas[index] = self._copy(replica.device)
                continue
            with torch.inference_mode(False), torch.no_grad():
                for name, tensor in source.items():
                    target[name].detach().copy_(tensor.detach())
            replica.serve.engine_set.refresh()
        self.owner.engine_set.refresh()  # its own share may have been vouched for with the old weights
        logger.info("%s: weights changed (%s); the copies on %s follow", self.label, why,
                    [str(r.device) for r in self._replicas if not r.own])
        self._original = Stamp(self.owner.module)

    def refresh(self) -> None:
        """Make the copies again on the next call (e.g. after non-tensor attributes of the original changed)."""
        with self._lock:
            self.close()
            self._replicas = None

    def close(self) -> None:
        for replica in self._replicas or ():
            replica.close()


_NO_FORWARD = object()  # stands for the owner wrapper while its module is deep-copied


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied and non-persistent ones included (a forward reads them all)."""
    return {**dict(module.named_parameters(remove_duplicate=False)),
            **dict(module.named_buffers(remove_duplicate=False))}


def module_device(module: nn.Module) -> torch.device:
    """Where the module's weights are (its first parameter, else buffer; CPU for a module without tensors)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def split_sizes(batch: int, devices: int) -> list[int]:
    """Contiguous share sizes for `batch` items on `devices` replicas: near-equal, larger shares first, none empty."""
    count = min(devices, batch)
    return [batch // count + (1 if i < batch % count else 0) for i in range(count)]


def _batched(leaf: Any, batch: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == batch


def _gather(outputs: list[Any], sizes: list[int]) -> tuple[Any, str | None]:
    """Concatenate the shares' outputs along dim 0, leaf by leaf; or (None, why they cannot be)."""
    flat = [pytree.tree_flatten(o) for o in outputs]
    spec = flat[0][1]
    if any(s != spec for _, s in flat[1:]):
        return None, "the shares returned differently structured outputs"
    gathered = []
    for position in range(len(flat[0][0])):
        items = [leaves[position] for leaves, _ in flat]
        if all(isinstance(t, torch.Tensor) for t in items):
            if not all(t.dim() >= 1 and t.shape[0] == n for t, n in zip(items, sizes)):
                return None, f"output {position} is not batched along dim 0 (shapes {[tuple(t.shape) for t in items]})"
            gathered.append(torch.cat(items, dim=0))
        elif all(not isinstance(t, torch.Tensor) for t in items) and all(t == items[0] for t in items[1:]):
            gathered.append(items[0])
        else:
            return None, f"output {position} differs between shares and is not a batched tensor"
    return pytree.tree_unflatten(gathered, spec), None
