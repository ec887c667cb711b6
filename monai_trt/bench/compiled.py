"""The PyTorch peers of an engine in `bench`: the network cast to fp16/bf16 (eager `eager_fp16`, and the network of
`compile_fp16`), and torch.compile with its compile time.

A cast network takes and returns the caller's dtypes, as an engine of that precision does (inputs cast on the way
in, outputs cast back). A compile mode runs in a fresh Inductor cache (a cold compile, as an engine build is measured
from an empty engine cache). Its compile time is what the first calls cost beyond a steady call: calls at the window
batch until two in a row agree within 10 % (CUDA graphs are recorded on the second or third call of
`reduce-overhead`), plus the first sliding-window pass beyond a timed one (a smaller last window batch compiles
again).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from monai_trt.export.graph import plain_copy

__all__ = ["HALF", "CastNetwork", "precision_network", "fresh_inductor_cache", "compile_network", "graph_stats",
           "warm_up", "release"]

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
STABLE = 0.10  # two calls in a row within 10 % of each other: compiled (and CUDA graphs recorded)
MIN_CALLS = 3
MAX_CALLS = 8


class CastNetwork(nn.Module):
    """`network` (already cast to `dtype`) behind casts: floating inputs to `dtype`, floating outputs back to the
    first floating input's dtype."""

    def __init__(self, network: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network, self.dtype = network, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        floats = [t.dtype for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        args, kwargs = pytree.tree_map(self._to(self.dtype), (args, kwargs))
        out = self.network(*args, **kwargs)
        return pytree.tree_map(self._to(floats[0]), out) if floats else out

    @staticmethod
    def _to(dtype: torch.dtype) -> Callable[[Any], Any]:
        return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def precision_network(network: nn.Module, precision: str) -> nn.Module:
    """`network` itself for fp32/tf32/amp; for fp16/bf16 a cast copy behind :class:`CastNetwork` (the workload's
    network stays fp32 for the other modes)."""
    dtype = HALF.get(precision)
    if dtype is None:
        return network
    return CastNetwork(plain_copy(network).to(dtype), dtype)


@contextlib.contextmanager
def fresh_inductor_cache(folder: Path) -> Iterator[None]:
    """An empty Inductor (and Triton) cache under `folder` while inside, removed on exit."""
    from torch._inductor import utils

    fresh = getattr(utils, "fresh_cache", None) or utils.fresh_inductor_cache  # renamed in torch 2.8
    folder.mkdir(parents=True, exist_ok=True)
    with fresh(dir=str(folder)):
        yield


def compile_network(network: nn.Module, compile_mode: str) -> nn.Module:
    """`torch.compile(network, mode=...)` from a clean Dynamo state (earlier modes' graphs dropped)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(network, mode=compile_mode)


def graph_stats() -> dict[str, int]:
    """Graphs Dynamo compiled and graph breaks it met since :func:`compile_network`."""
    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"]["unique_graphs"]), "graph_breaks": sum(counters["graph_break"].values())}


def warm_up(call: Callable[[], Any], sync: Callable[[], None], over: Callable[[], str | None]) -> dict[str, Any]:
    """Call until two calls in a row agree within `STABLE` (at least `MIN_CALLS`, at most `MAX_CALLS`; stops early
    when `over()` says the budget is spent). Returns the call times, whether they settled, and the compile time so
    far: the calls' excess over the last one."""
    times: list[float] = []
    stable = False
    while len(times) < MAX_CALLS:
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
        stable = len(times) >= MIN_CALLS and abs(times[-1] - times[-2]) <= STABLE * times[-2]
        if stable or over():
            break
    steady = times[-1]
    return {"first_call_s": times[0], "calls_s": times, "stable": stable, "steady_call_s": steady,
            "window_compile_s": max(sum(times) - steady * len(times), 0.0)}


def release(device: torch.device) -> None:
    """Drop compiled graphs (and CUDA graph pools) before the next mode."""
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
