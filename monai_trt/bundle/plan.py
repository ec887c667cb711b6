"""`python -m monai_trt plan`: the plans of a bundle's `submodule: auto` entries, with each part's share of the time.

The network is patched and driven exactly as `build` drives it (so the search runs, or a remembered plan is read),
then unpatched and run once more in PyTorch with forward hooks timing the search roots and every planned module:
a module's share is its PyTorch time over its search root's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from monai_trt.bundle.build import BuiltEngine, build_engines, plan_calls
from monai_trt.bundle.load import Bundle
from monai_trt.runtime.hook import remove, wrappers
from monai_trt.runtime.planner import PlanningWrapper, Search, format_plan

__all__ = ["plan_bundle", "PlanResult"]


class PlanResult:
    """The plans found (one per search root), the time shares, and the engines `build` reported."""

    def __init__(self, searches: list[Search], shares: dict[str, dict[str, float]], engines: list[BuiltEngine],
                 failures: list[str]) -> None:
        self.searches, self.shares, self.engines, self.failures = searches, shares, engines, failures

    def text(self, network: str) -> str:
        parts = []
        for search in self.searches:
            origin = "remembered" if search.loaded else "searched now"
            parts.append(f"plan for '{search.spec.submodule or '<network>'}' ({origin}; key {str(search.key)[:12]}):\n"
                         + format_plan(search.nodes, network, self.shares.get(search.spec.submodule)))
        return "\n".join(parts) or "no `submodule: auto` entry in trt_patch"

    def to_json(self) -> dict[str, Any]:
        return {"plans": [{
            "root": s.spec.submodule, "key": s.key, "remembered": s.loaded,
            "nodes": {p: {**n.to_json(), "share": self.shares.get(s.spec.submodule, {}).get(p)}
                      for p, n in s.nodes.items()},
        } for s in self.searches], "failures": self.failures}


def plan_bundle(bundle: Bundle, batch: Any = None, spatial_shape: Any = None,
                on_call: Callable[[str], None] | None = None) -> PlanResult:
    """Search (or read) the plan of every `submodule: auto` entry of `bundle`, then time its parts in PyTorch."""
    engines, failures = build_engines(bundle, batch, spatial_shape, on_call)
    searches = []
    for wrapper in wrappers(bundle.network).values():
        if isinstance(wrapper, PlanningWrapper) and not wrapper.plan_child:
            searches.append(wrapper.search)
    calls = plan_calls(bundle, batch, spatial_shape)
    remove(bundle.network)
    return PlanResult(searches, _shares(bundle, searches, calls), engines, failures)


def _shares(bundle: Bundle, searches: list[Search], calls: list) -> dict[str, dict[str, float]]:
    """PyTorch time of each planned module over its search root's, from one hooked run of `calls`."""
    spent: dict[int, float] = {}
    started: dict[int, list[float]] = {}
    handles = []
    modules: dict[str, dict[str, int]] = {}
    for search in searches:
        root = search.spec.submodule
        modules[root] = {}
        for path in search.nodes:
            module = bundle.network.get_submodule(path) if path else bundle.network
            modules[root][path] = id(module)
            if id(module) in spent:
                continue
            spent[id(module)] = 0.0
            handles += _timing_hooks(module, spent, started)
    try:
        with torch.no_grad():
            for _, call in calls:
                call()
    finally:
        for handle in handles:
            handle.remove()
    shares: dict[str, dict[str, float]] = {}
    for root, ids in modules.items():
        total = spent.get(ids[root], 0.0)
        shares[root] = {path: (spent[key] / total if total else 0.0) for path, key in ids.items()}
    return shares


def _timing_hooks(module: torch.nn.Module, spent: dict[int, float], started: dict[int, list[float]]) -> list[Any]:
    key = id(module)

    def before(*_: Any) -> None:
        started.setdefault(key, []).append(time.perf_counter())

    def after(*_: Any) -> None:
        spent[key] += time.perf_counter() - started[key].pop()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
