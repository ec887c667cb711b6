"""Where a bundle run loads checkpoints: the loaders reached from `initialize`/`run`/`finalize`, and what they load."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monai_trt.bundle.zoo.configs import MISSING, ROOT_IDS, lookup, norm
from monai_trt.bundle.zoo.expressions import alias_group, live_nodes, parse_expr, refs_in, root_ref, same_object_parent

LOAD_METHODS = frozenset({"load_state_dict", "load_old_state_dict"})


@dataclass(frozen=True)
class Loader:
    """A place where the merged config loads a checkpoint into a network.

    Attributes:
        where: config id of the loader (`handlers::0`, `checkpointloader`, `load_diffusion`, ...).
        kind: `CheckpointLoader` or the method called (`load_state_dict`, `load_old_state_dict`).
        targets: ids the weights are loaded into (as written in the config, `::`-separated).
        source: the loader's `load_path` or the loading expression, for messages.
    """

    where: str
    kind: str
    targets: tuple[str, ...]
    source: str

    def describe(self) -> str:
        """One line for reports."""
        into = ", ".join(f"@{t}" for t in self.targets)
        return f"{self.kind} at '{self.where}' loads {self.source} into {into}"


def _disabled(node: Mapping[str, Any]) -> bool:
    """A component whose `_disabled_` is literally true (MONAI skips it)."""
    flag = node.get("_disabled_")
    return flag is True or (isinstance(flag, str) and flag.strip().lower() in ("true", "$true"))


class _RunWalker:
    """Follows references from the ids a run executes; records every active checkpoint loader and live string."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.seen: set[str] = set()
        self.loaders: list[Loader] = []
        self.texts: list[str] = []  # every live string reached (for leftover zoo-engine checks)
        for root in ROOT_IDS:
            self.visit(root)

    def visit(self, config_id: str) -> None:
        if config_id in self.seen:
            return
        self.seen.add(config_id)
        node = lookup(self.config, config_id)
        if node is not MISSING:
            self.walk(node, config_id)

    def walk(self, node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            if _disabled(node):
                return
            target = node.get("_target_")
            if isinstance(target, str) and norm(target).replace("::", ".").split(".")[-1] == "CheckpointLoader":
                self.loaders.append(Loader(where, "CheckpointLoader", self._load_dict_targets(node.get("load_dict")),
                                           str(node.get("load_path"))))
            for key, value in node.items():
                self.walk(value, f"{where}::{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                self.walk(value, f"{where}::{index}")
        elif isinstance(node, str):
            self.walk_text(node, where)

    def walk_text(self, text: str, where: str) -> None:
        self.texts.append(text)
        expr = parse_expr(text)
        if expr is None:
            for ref in refs_in(text):
                self.visit(ref)
            return
        for node in live_nodes(expr.tree, expr, self.config):
            referenced = expr.ref(node)
            if referenced is not None:
                self.visit(referenced)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOAD_METHODS:
                target = root_ref(node.func.value, expr)
                if target is not None:
                    self.loaders.append(Loader(where, node.func.attr, (target,), expr.unparse(node)))

    def _load_dict_targets(self, load_dict: Any) -> tuple[str, ...]:
        if isinstance(load_dict, str):
            referenced = same_object_parent(load_dict)
            load_dict = lookup(self.config, referenced) if referenced else MISSING
        if not isinstance(load_dict, Mapping):
            return ()
        return tuple(t for t in map(same_object_parent, load_dict.values()) if t is not None)


def find_checkpoint_loaders(config: Mapping[str, Any], network_id: str | None = None) -> list[Loader]:
    """Checkpoint loaders a `monai.bundle run` of `config` executes, optionally only those loading `network_id`.

    Reached from `initialize`, `run` and `finalize` through references (e.g. `$@checkpointloader(@evaluator)`, the
    evaluator's `val_handlers`, `_requires_`): `CheckpointLoader` components not disabled by a literal `_disabled_`,
    and `load_state_dict`/`load_old_state_dict` calls. A branch of `x if @flag else y` is skipped when `flag` is a
    literal that rules it out (`load_pretrain: false`).

    Args:
        config: a merged raw config (as `ConfigParser.load_config_files` returns it).
        network_id: keep only loaders whose target is this id or names the same module (`@network_def.to(...)`).
    """
    loaders = _RunWalker(config).loaders
    if network_id is None:
        return loaders
    group = alias_group(config, network_id)
    return [loader for loader in loaders if group & set(loader.targets)]


def zoo_engine_uses(config: Mapping[str, Any]) -> list[str]:
    """The strings a run of `config` reaches that still load or build a zoo engine (`torch.jit.load`, `trt_compile`)."""
    return sorted({t for t in _RunWalker(config).texts if "torch.jit.load(" in t or "trt_compile(" in t})
