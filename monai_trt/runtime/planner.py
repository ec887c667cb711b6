"""`submodule: auto`: find the largest subtrees that convert and pay; the rest stays in PyTorch.

A search root (the network, or each path of `search_under`) gets a :class:`PlanningWrapper`. On the first call
that an engine could serve, a node is tried as one engine through the ordinary life cycle (export, build,
validation, speed gate, failure memory). When it serves, it stays an engine. When export, build or validation
fails, the call cannot be captured, or the speed gate rejects the engine, the node is *split*: its children
(descending through `ModuleList`/`ModuleDict`, skipping those holding fewer than :data:`MIN_PARAM_SHARE` of the
root's parameters) get planning wrappers of their own and the node's own forward runs again, so each child is tried
on its first call — recursively, at most `search_depth` levels below the root, within `search_seconds` per root
and process (past it, untried nodes stay in PyTorch).

The outcome is a plan (`plans/<key>.json` in the cache): each tried path with its state (`engine`, `split`,
`pytorch`, `pending` = not called yet), why, and the speed measured by the gate. The key covers the root's
architecture fingerprint, its call layout, the weights mode (`refit`), the settings that decide what converts, the
torch version and the machine: a later process with the same key installs the plan at its first call and probes
nothing; anything in the key changing searches again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from monai_trt.cache.keys import digest
from monai_trt.events import report
from monai_trt.patch import PatchEntry
from monai_trt.runtime.calls import UnsupportedCall, capture_call
from monai_trt.runtime.lifecycle import open_cache
from monai_trt.runtime.stamps import architecture_fingerprint
from monai_trt.runtime.verdicts import machine_id
from monai_trt.runtime.wrapper import EngineWrapper

__all__ = ["PlanningWrapper", "Search", "Node", "RECORD", "MIN_PARAM_SHARE", "plan_tree"]

logger = logging.getLogger(__name__)

RECORD = "plans"
SCHEMA = 1
MIN_PARAM_SHARE = 0.01  # a child holding fewer than 1 % of its root's parameters is not tried on its own
STATES = ("engine", "split", "pytorch", "pending")
_CALL_CAUSES = ("call:", "types:", "profile:")  # warn_once causes that mean: this call cannot become an engine


@dataclass
class Node:
    """One tried module of a search: where it is, what it became, and why."""

    path: str
    depth: int
    state: str = "pending"
    reason: str = ""
    speed: dict[str, float] | None = None  # the speed gate's measurement: engine_s, pytorch_s

    def to_json(self) -> dict[str, Any]:
        return {"depth": self.depth, "state": self.state, "reason": self.reason, "speed": self.speed}


@dataclass
class Search:
    """The plan of one search root in this process (shared by the root's and its descendants' wrappers)."""

    network: str
    root: nn.Module
    spec: PatchEntry
    nodes: dict[str, Node] = field(default_factory=dict)
    key: str | None = None
    key_inputs: dict[str, Any] | None = None
    loaded: bool = False  # the plan came from the cache (nothing probed in this process)
    started: float | None = None
    active: bool = False  # inside a call of the root
    changed: bool = False

    # ------------------------------------------------------------------ the record
    def begin(self, wrapper: PlanningWrapper, args: Any, kwargs: Any) -> None:
        """First call of the root in this process: compute the plan key and install a remembered plan."""
        if self.key is not None:
            return
        self.key_inputs = _key_inputs(wrapper, args, kwargs)
        self.key = digest(self.key_inputs)
        record = open_cache(self.spec.path).read_record(RECORD, self.key)
        nodes = _parse_nodes(record, self.spec.submodule)
        if nodes is None:
            logger.info("%s: no plan for this network, call layout and machine yet: searching (depth %d, %.0f s "
                        "budget)", wrapper.label, self.spec.search_depth, self.spec.search_seconds)
            return
        root_path = self.spec.submodule
        modules = {path: _get(wrapper.module, root_path, path) for path in nodes if path != root_path}
        missing = [path for path, module in modules.items() if module is None]
        if missing:  # cannot happen under the same architecture fingerprint; search again to be safe
            logger.info("%s: the plan names %s, not in the network: searching again", wrapper.label, missing)
            return
        self.loaded = True
        root = self.nodes[self.spec.submodule]
        saved = nodes[self.spec.submodule]
        root.state, root.reason, root.speed = saved.state, saved.reason, saved.speed
        for path, module in modules.items():
            self.install(module, nodes[path], wrapper.network)
        if root.state == "pytorch" or root.state == "split":
            wrapper.disabled = wrapper.disabled or f"planned: {root.reason}"
        engines = [p or "<network>" for p, n in self.nodes.items() if n.state == "engine"]
        logger.info("%s: using the plan found earlier (%s): engines for %s", wrapper.label,
                    open_cache(self.spec.path).root / RECORD / f"{self.key}.json", engines or "nothing")

    def end(self, label: str) -> None:
        if not self.changed:
            return
        self.changed = False
        record = {"schema": SCHEMA, "root": self.spec.submodule, "key_inputs": self.key_inputs,
                  "search_seconds": round(time.perf_counter() - (self.started or time.perf_counter()), 3),
                  "nodes": {path: node.to_json() for path, node in self.nodes.items()}}
        if self.key is not None:
            open_cache(self.spec.path).write_record(RECORD, self.key, record)
        logger.info("%s: plan\n%s", label, format_plan(self.nodes, self.network))

    # ------------------------------------------------------------------ the search
    def install(self, module: nn.Module, node: Node, network: str) -> PlanningWrapper:
        self.nodes[node.path] = node
        wrapper = PlanningWrapper(module, replace(self.spec, submodule=node.path), network, self, node)
        module.forward = wrapper
        if node.state == "pytorch":
            wrapper.disabled = f"planned: {node.reason}"
        return wrapper

    def over_budget(self) -> bool:
        if self.started is None:
            self.started = time.perf_counter()
        return time.perf_counter() - self.started > self.spec.search_seconds

    def children(self, module: nn.Module, path: str) -> list[tuple[str, nn.Module]]:
        """The children worth trying on their own (see the module docstring)."""
        total = sum(p.numel() for p in self.root.parameters())
        known = {id(m) for m in self.root.modules() if isinstance(m.__dict__.get("forward"), EngineWrapper)}
        found: list[tuple[str, nn.Module]] = []

        def walk(parent: nn.Module, prefix: str) -> None:
            for name, child in parent.named_children():
                where = f"{prefix}.{name}" if prefix else name
                if id(child) in known:
                    continue
                known.add(id(child))
                if type(child).forward is nn.Module.forward:  # a container without a forward of its own
                    walk(child, where)
                    continue
                count = sum(p.numel() for p in child.parameters())
                if count and count >= MIN_PARAM_SHARE * total:
                    found.append((where, child))

        walk(module, path)
        return found


class PlanningWrapper(EngineWrapper):
    """An EngineWrapper that, while its node is undecided, tries the engine and splits the node when it fails."""

    plan_child = False

    def __init__(self, module: nn.Module, spec: PatchEntry, network: str, search: Search | None = None,
                 node: Node | None = None) -> None:
        super().__init__(module, spec, network)
        if search is None:
            search = Search(network, module, spec)
            node = Node(spec.submodule, 0)
            search.nodes[node.path] = node
        else:
            self.plan_child = True
        self.search, self.node = search, node

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        search = self.search
        top = not self.plan_child and not search.active
        if not top:
            return self._dispatch(args, kwargs)
        search.active = True
        try:
            search.begin(self, args, kwargs)
            return self._dispatch(args, kwargs)
        finally:
            search.active = False
            search.end(self.label)

    def _dispatch(self, args: Any, kwargs: Any) -> Any:
        state = self.node.state
        if state == "engine":
            return super().__call__(*args, **kwargs)
        if state in ("split", "pytorch"):
            return self._pytorch(args, kwargs)
        return self._probe(args, kwargs)

    def _probe(self, args: Any, kwargs: Any) -> Any:
        node, search = self.node, self.search
        if self._pytorch_only(args, kwargs):  # autograd, training mode, tracing: not a verdict on the module
            return self._pytorch(args, kwargs)
        if search.over_budget():
            return self._decide(args, kwargs, "search_seconds spent before this module was tried")
        report(self.label, "auto: trying an engine")
        before = self.calls["engine"]
        result = super().__call__(*args, **kwargs)
        if self.calls["engine"] > before:
            node.state, node.reason, node.speed = "engine", "", self._speed()
            search.changed = True
            report(self.label, "auto: engine")
            return result
        why = self._why_not()
        if why is None:  # e.g. another process is building this engine: try again on a later call
            return result
        children = self.search.children(self.module, node.path) if node.depth < self.spec.search_depth else []
        if not children:
            limit = "; search_depth reached" if node.depth >= self.spec.search_depth else ""
            node.state, node.reason, node.speed = "pytorch", why + limit, self._speed()
            self.disabled = self.disabled or f"planned: {node.reason}"
            search.changed = True
            return result
        node.state, node.reason, node.speed = "split", why, self._speed()
        self.disabled = self.disabled or f"planned: {why}"
        search.changed = True
        report(self.label, f"auto: trying {len(children)} children")
        for path, child in children:
            search.install(child, Node(path, node.depth + 1), self.network)
        return self.original(*args, **kwargs)  # once more, so that the children are tried on this very call

    def _decide(self, args: Any, kwargs: Any, why: str) -> Any:
        self.node.state, self.node.reason = "pytorch", why
        self.disabled = f"planned: {why}"
        self.search.changed = True
        return self._pytorch(args, kwargs)

    def _why_not(self) -> str | None:
        """Why the engine did not serve the call just tried (None: no verdict on the module yet)."""
        if self.disabled:
            return _short(self.disabled)
        speed = self._speed(rejected=True)
        if speed is not None:
            return (f"not {self.spec.speed_gate:.2f}x faster than PyTorch (engine {1e3 * speed['engine_s']:.1f} ms, "
                    f"PyTorch {1e3 * speed['pytorch_s']:.1f} ms)")
        causes = [c for c in self.engine_set._warned if c.startswith(_CALL_CAUSES)]
        return _short(causes[0].split(":", 1)[1]) if causes else None

    def _speed(self, rejected: bool = False) -> dict[str, float] | None:
        for engines in self.engine_set.by_layout.values():
            for loaded in engines:
                speed = loaded.verdicts.speed if loaded.verdicts is not None else None
                if speed is not None and (not rejected or not loaded.serve):
                    return {"engine_s": speed["engine_s"], "pytorch_s": speed["pytorch_s"]}
        return None

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineWrapper:
        raise TypeError("a network patched with `submodule: auto` cannot be deep-copied; copy it before apply()")


def _short(text: str, head: int = 100, tail: int = 260) -> str:
    """One line; a long cause keeps its start (what failed) and its end (the conclusion)."""
    text = " ".join(str(text).split())
    return text if len(text) <= head + tail + 5 else f"{text[:head]} ... {text[-tail:]}"


def _key_inputs(wrapper: PlanningWrapper, args: Any, kwargs: Any) -> dict[str, Any]:
    """What decides the plan: the root's architecture and call layout, the settings, the machine."""
    spec = wrapper.spec
    try:
        call = capture_call(wrapper._signature, args, kwargs, wrapper.engine_set.input_float_dtype)
        layout, device = call.layout.to_json(), torch.device(call.layout.device)
    except UnsupportedCall as err:
        layout, device = {"unsupported": str(err)}, _device(wrapper.module)
    return {
        "schema": SCHEMA,
        "root": spec.submodule,
        "module_class": f"{type(wrapper.module).__module__}.{type(wrapper.module).__qualname__}",
        "architecture": architecture_fingerprint(wrapper.module),
        "layout": layout,
        "refit": spec.refit,
        "settings": {
            "method": spec.method, "precision": spec.precision, "build_args": dict(spec.build_args),
            "export_args": dict(spec.export_args), "min_speedup": spec.speed_gate, "validate": spec.validate,
            "tolerance": spec.tolerance, "dynamic_batchsize": spec.dynamic_batchsize,
            "input_profiles": [dict(p) for p in spec.input_profiles], "search_depth": spec.search_depth,
            "min_param_share": MIN_PARAM_SHARE,
        },
        "torch": torch.__version__,
        "machine": machine_id(device.type, device.index),
    }


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _get(root: nn.Module, root_path: str, path: str) -> nn.Module | None:
    relative = path[len(root_path) + 1:] if root_path else path
    if root_path and not path.startswith(root_path + "."):
        return None
    try:
        return root.get_submodule(relative)
    except AttributeError:
        return None


def _parse_nodes(record: Any, root: str) -> dict[str, Node] | None:
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("nodes"), dict):
        return None
    nodes = {}
    for path, raw in record["nodes"].items():
        if not isinstance(raw, dict) or raw.get("state") not in STATES or not isinstance(raw.get("depth"), int):
            return None
        speed = raw.get("speed") if isinstance(raw.get("speed"), dict) else None
        nodes[path] = Node(path, raw["depth"], raw["state"], str(raw.get("reason") or ""), speed)
    return nodes if root in nodes else None


def plan_tree(nodes: dict[str, Node]) -> list[Node]:
    """Nodes in tree order (each after its parent)."""
    return [nodes[p] for p in sorted(nodes, key=lambda p: (p.split(".") if p else []))]


def format_plan(nodes: dict[str, Node], network: str = "", shares: dict[str, float] | None = None) -> str:
    """The plan as an indented tree: state, measured speed-up, share of the network's PyTorch time, why."""
    lines = []
    for node in plan_tree(nodes):
        name = ".".join(p for p in (network, node.path) if p) or "<network>"
        what = {"engine": "ENGINE", "split": "split", "pytorch": "PyTorch", "pending": "not called yet"}[node.state]
        extra = []
        if node.speed and node.speed.get("engine_s"):
            extra.append(f"{node.speed['pytorch_s'] / node.speed['engine_s']:.2f}x")
        if shares is not None and node.path in shares:
            extra.append(f"{100 * shares[node.path]:.0f} % of the time")
        if node.reason:
            extra.append(node.reason)
        lines.append(f"{'  ' * node.depth}{name}: {what}" + (f" ({'; '.join(extra)})" if extra else ""))
    return "\n".join(lines)
