"""CUDA graphs for engines that allocate their own outputs (AOTInductor): capture once per input layout, replay.

An engine call launches hundreds to thousands of kernels, each costing host time, and an AOTInductor run holds the
GIL while it launches (so two threads serving two GPUs take turns). A CUDA graph replays them all in one launch,
without the GIL. :class:`GraphedEngine` wraps an engine (`inputs -> outputs`, new output tensors each call):

- The first call with a new input layout (shapes, strides, dtypes, device) runs the engine as usual (that run also
  warms it up), copies the inputs into static buffers, captures a run on those buffers, replays it once and compares
  the replay with the plain run. They must agree (relative L2 <= :data:`REPLAY_TOLERANCE`): a graph that misses work
  the engine does on the host would answer stale values, so a disagreement or a failed capture turns graphs off for
  this engine (one warning) and every call runs plainly. The plain run answers that first call.
- Later calls with that layout copy their inputs into the static buffers, replay, and return clones of the static
  outputs (the next replay overwrites them).
- At most :data:`MAX_GRAPHS` layouts are captured per engine; further layouts run plainly (logged once).
- :meth:`forget` drops every graph (after a refit: a graph bakes in the addresses of the weights it read).

All graphs of one engine share one memory pool; replays are ordered after the previous call's output copies (an
event the next replay's stream waits on), so calls from different streams never overlap on that memory.

Capture is injectable (`capture`) so the bookkeeping runs on CPU in tests: a CPU "capture" binds the engine to the
static buffers and "replays" by running it on them again, which, like a real graph, answers stale values if an
input was not copied in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["GraphedEngine", "Capture", "capture_cuda_graph", "replay_mismatch", "MAX_GRAPHS", "REPLAY_TOLERANCE"]

logger = logging.getLogger(__name__)
MAX_GRAPHS = 8  # input layouts captured per engine (a sliding window needs two: full and last window batch)
REPLAY_TOLERANCE = 1e-3  # relative L2 between the first replay and the plain run of the same inputs

Run = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]
Capture = Callable[[Callable[[], list[torch.Tensor]], Any, torch.device],
                   tuple[Callable[[], None], list[torch.Tensor]]]


def capture_cuda_graph(run: Callable[[], list[torch.Tensor]], pool: Any, device: torch.device
                       ) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """Capture `run()` on `device` in a CUDA graph drawing on `pool`: (replay, the static outputs the replay writes).

    On a capture stream of that device (torch's shared default capture stream lives on whichever device first used
    it), in `thread_local` mode, so other threads (other devices' replicas) may keep launching meanwhile."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
            outputs = run()
    return graph.replay, outputs


def replay_mismatch(replayed: Sequence[torch.Tensor], plain: Sequence[torch.Tensor]) -> str:
    """Empty when a replay reproduced the plain run of the same inputs: same shapes and dtypes, NaN and ±Inf where it
    had them, finite values within relative L2 :data:`REPLAY_TOLERANCE` (the same kernels; summation order may vary),
    other values equal. Else what differs."""
    if len(replayed) != len(plain):
        return f"{len(replayed)} outputs, the plain run {len(plain)}"
    for i, (got, want) in enumerate(zip(replayed, plain)):
        if got.shape != want.shape or got.dtype != want.dtype:
            return f"output {i}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}"
        if not want.is_floating_point():
            if not torch.equal(got, want):
                return f"output {i}: values differ"
            continue
        got, want = got.double(), want.double()
        finite = want.isfinite()
        special = ~finite  # NaN and ±Inf must be the same, where they are
        same_special = torch.equal(got[special].nan_to_num(), want[special].nan_to_num())
        if not torch.equal(got.isfinite(), finite) or not same_special:
            return f"output {i}: NaN or infinities in other places"
        diff = torch.linalg.vector_norm((got - want)[finite])
        error = float(diff / torch.linalg.vector_norm(want[finite]).clamp_min(1e-12))
        if not error <= REPLAY_TOLERANCE:
            return f"output {i}: relative L2 error {error:.3g}"
    return ""


class GraphedEngine:
    """An engine whose calls replay CUDA graphs (see the module docstring).

    Args:
        engine: `inputs -> outputs` (fresh output tensors each call).
        device: where it runs (CUDA; CPU only with an injected `capture`).
        capture: how to capture (default: :func:`capture_cuda_graph`).
        label: the engine, for messages.

    Attributes:
        captures / replays / plain: calls that captured a graph, that replayed one, that ran the engine plainly.
        refused: why graphs are off for this engine (None while they are on).
    """

    def __init__(self, engine: Run, device: torch.device, capture: Capture | None = None, label: str = "engine"):
        self._engine = engine
        self._device = device
        self._capture = capture or capture_cuda_graph
        self._label = label
        self._graphs: dict[tuple[Any, ...], tuple[list[torch.Tensor], Callable[[], None], list[torch.Tensor]]] = {}
        self._pool: Any = None
        self._done: Any = None  # event after the last replay's output copies (CUDA)
        self._lock = threading.Lock()  # this engine's static buffers only
        self._full_noted = False
        self.captures = self.replays = self.plain = 0
        self.refused: str | None = None

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs)
        with self._lock:  # also around plain runs: the runner a capture needs is not made for concurrent calls
            if self.refused is not None:
                return self._plain(inputs)
            found = self._graphs.get(key)
            if found is None:
                return self._first(key, inputs)
            static_inputs, replay, static_outputs = found
            self._after_previous()
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor)
            replay()
            outputs = [t.clone() for t in static_outputs]
            self._mark_done()
            self.replays += 1
            return outputs

    def forget(self) -> None:
        """Drop every graph (the next call per layout captures again)."""
        with self._lock:
            self._graphs.clear()

    # ------------------------------------------------------------------ internals
    def _plain(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.plain += 1
        return self._engine(inputs)

    def _first(self, key: tuple[Any, ...], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """A plain run answers; then, room permitting, capture this layout and check one replay against it."""
        outputs = self._plain(inputs)
        if len(self._graphs) >= MAX_GRAPHS:
            if not self._full_noted:
                self._full_noted = True
                logger.info("%s: %d input layouts captured in CUDA graphs; further layouts run without one",
                            self._label, MAX_GRAPHS)
            return outputs
        try:
            static_inputs = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                             for t in inputs]
            if self._pool is None and self._device.type == "cuda":
                self._pool = torch.cuda.graph_pool_handle()
            self._after_previous()
            replay, static_outputs = self._capture(lambda: self._engine(static_inputs), self._pool, self._device)
            replay()
            mismatch = replay_mismatch(static_outputs, outputs)
        except Exception as err:  # capture unsupported by this engine (host syncs, CPU work...): run plainly
            self._refuse(f"capture failed ({type(err).__name__}: {err})")
            return outputs
        if mismatch:
            self._refuse(f"a replay disagreed with the plain run of the same inputs ({mismatch})")
            return outputs
        self._graphs[key] = (static_inputs, replay, static_outputs)
        self._mark_done()
        self.captures += 1
        logger.debug("%s: CUDA graph captured for input shapes %s", self._label, [list(t.shape) for t in inputs])
        return outputs

    def _refuse(self, why: str) -> None:
        self.refused = why
        self._graphs.clear()
        logger.warning("%s: CUDA graphs turned off for this engine, its calls run without them: %s", self._label, why)

    def _after_previous(self) -> None:
        if self._done is not None:
            torch.cuda.current_stream(self._device).wait_event(self._done)

    def _mark_done(self) -> None:
        if self._device.type == "cuda":
            self._done = torch.cuda.Event()
            self._done.record(torch.cuda.current_stream(self._device))
