"""The per-call content check of a module's tensors (part of :class:`~monai_trt.runtime.stamps.Stamp`): small tensors
compared byte for byte with a copy, large floating ones by two statistics; on CUDA asynchronous (read behind an event)
and, once a stamp has lived a few calls, replayed as one CUDA graph. What it can miss is in the README ("What is
detected").
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Iterable
from typing import Callable

import numpy as np
import torch

from monai_trt.backends.cuda_graph import capture_cuda_graph

__all__ = ["ContentCheck", "Pending", "GRAPH_AFTER", "EXACT_ELEMENTS"]

logger = logging.getLogger(__name__)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY = (torch.float16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
          torch.bool)  # CPU tensors of these dtypes are checked through numpy


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
