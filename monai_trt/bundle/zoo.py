"""Convert a model-zoo bundle's TensorRT config into a monai_trt patch file that keeps the bundle's weights.

Model-zoo bundles ship `configs/inference_trt.json` (or `.yaml`) in one of two styles:

- `trt_compile`: an id the run uses (`network`, `diffusion`, `autoencoder`, ...) is overridden by
  `$trt_compile(<module>, <base_path>, args=@<dict>, submodule=[...])`. The bundle's own checkpoint loading stays.
- `torch_tensorrt`: `network_def` is replaced by `$torch.jit.load(<.ts>)`, an engine exported beforehand by
  `python -m monai.bundle trt_export` (flags documented in the bundle's README) with the weights baked in. Because of
  that, these files may override `imports` and `initialize` (dropping a `CheckpointLoader` called there), disable
  handlers (dropping a `CheckpointLoader` handler) and turn the evaluator's AMP off.

:func:`convert_bundle` reads both files (and the README for `trt_export` flags) and writes a patch that merges on
top of the bundle's own inference config like `configs/inference_trt.json` does (`+imports`, the `trt` switch, one
`trt_patch` section per patched network, `+initialize` with `monai_trt.apply`). None of the zoo file's network,
handler, `initialize` or `imports` overrides is carried over, and the conversion is refused
(:class:`ConversionError`) when the merged config would not load a checkpoint into every patched network.
:func:`check_patch` runs the same checks on any patch file, e.g. one converted by hand.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monai_trt.errors import PatchError
from monai_trt.patch.spec import IGNORED_ZOO_EXPORT_ARGS, METHODS, PRECISIONS, parse_patch

__all__ = [
    "Conversion", "ConversionError", "Loader", "convert_bundle", "check_patch", "find_checkpoint_loaders",
    "parse_trt_export_commands", "find_bundle_file", "DEFAULT_OUT",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT = "configs/inference_monai_trt.json"
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
ROOT_IDS = ("initialize", "run", "finalize")  # what `python -m monai.bundle run` executes
SWITCH_ID = "trt"
# `trt_compile`'s own defaults (MONAI 1.6.1 monai/networks/trt_compiler.py) where `args` does not set them.
ZOO_DEFAULT_METHOD = "onnx"
ZOO_DEFAULT_PRECISION = "fp16"
ZOO_DEFAULT_BUILD_ARGS = {"builder_optimization_level": 5}  # trt_compile's default; "precision_constraints" = ours
# `trt_compile` args keys with no effect here (see docs/zoo_mapping.md): dropped from the converted entry.
DROPPED_ARGS = {
    "timestamp": "engines are keyed by content, never by mtime",
    "logger": "messages go to the monai_trt logger",
    "forward_override": "MONAI's TrtCompiler never uses it",
    "output_lists": "nested outputs are captured and restored automatically",
    "input_names": "engine inputs are always named after the forward's arguments",
}
CARRIED_ARGS = (
    "precision", "method", "build_args", "dynamic_batchsize", "input_profiles", "output_names", "fallback",
    "use_cuda_graph", "export_args",
)
TRT_IMPORT_MARKERS = ("torch_tensorrt", "trt_compile", "tensorrt", "monai_trt")
# Methods that return the very module they are called on, so `@a.to(@device)` names the same object as `@a`.
SAME_OBJECT_METHODS = frozenset({"to", "eval", "train", "cuda", "cpu", "float", "half", "double", "requires_grad_"})
LOAD_METHODS = frozenset({"load_state_dict", "load_old_state_dict"})

_REF = re.compile(r"@(\w+(?:(?:::|#)\w+)*)")
_MISSING = object()


class ConversionError(PatchError):
    """The zoo file cannot be converted into a patch that runs on the bundle's trained weights; says why."""


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


@dataclass
class Conversion:
    """The result of :func:`convert_bundle`.

    Attributes:
        patch: the patch dict (what was written to `out`).
        styles: the zoo styles found (`trt_compile`, `torch_tensorrt`).
        networks: patched network id -> the id of its `trt_patch` section.
        loaders: patched network id -> the checkpoint loaders that stay in the merged config.
        mapped: what was carried over and how.
        unmapped: what the converted file does not carry, and why (read these).
        source: the zoo TensorRT config that was read.
        inference: the bundle's inference config the patch merges onto.
        out: where the patch was written; None for a dry run.
        bundle_root: the bundle directory (paths in `run_command` are relative to it).
    """

    patch: dict[str, Any]
    styles: tuple[str, ...]
    networks: dict[str, str]
    loaders: dict[str, list[Loader]]
    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    source: Path | None = None
    inference: Path | None = None
    out: Path | None = None
    bundle_root: Path | None = None

    @property
    def notes(self) -> list[str]:
        """Every note, mapped first."""
        return [f"mapped: {m}" for m in self.mapped] + [f"not mapped: {u}" for u in self.unmapped]

    def run_command(self, bundle_root: str | Path = ".") -> str:
        """The `monai.bundle run` command for the converted patch (config paths relative to the bundle root).

        Args:
            bundle_root: the `--bundle_root` value to print (e.g. as the user typed it).
        """
        root = self.bundle_root or Path(bundle_root)
        out = self.out or root / DEFAULT_OUT
        files = [_relative(self.inference, root), _relative(out, root)]
        quoted = ",".join(f"'{f}'" for f in files)
        return f'python -m monai.bundle run --config_file "[{quoted}]" --bundle_root {bundle_root}'

    def report(self, bundle_root: str | Path = ".") -> str:
        """Human-readable summary: what was written, the checkpoint loaders kept, mapped and unmapped items."""
        lines = [f"converted {self.source} ({', '.join(self.styles)} style)"]
        lines.append(f"wrote {self.out}" if self.out else "dry run: nothing written")
        for net, section in self.networks.items():
            lines.append(f"network @{net}: entries in '{section}'; weights still come from:")
            lines.extend(f"  - {loader.describe()}" for loader in self.loaders.get(net, []))
        lines.append("mapped:")
        lines.extend(f"  - {m}" for m in self.mapped)
        lines.append("not mapped (check these):" if self.unmapped else "not mapped: nothing")
        lines.extend(f"  - {u}" for u in self.unmapped)
        lines.append("patch:")
        lines.append(json.dumps(self.patch, indent=2))
        lines.append("run (add --trt False, or env MONAI_TRT=0, for plain PyTorch):")
        lines.append(f"  {self.run_command(bundle_root)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Config access and expressions
# ----------------------------------------------------------------------------------------------------------------


def _norm(config_id: str) -> str:
    return config_id.replace("#", "::")


def _get(config: Any, config_id: str) -> Any:
    """The raw value at a `::`/`#`-separated id, or _MISSING."""
    node = config
    for part in _norm(config_id).split("::") if config_id else []:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


@dataclass
class _Expr:
    """A `$` expression parsed with its `@` references replaced by placeholder names."""

    tree: ast.expr
    refs: dict[str, str]  # placeholder -> normalized id
    texts: dict[str, str]  # placeholder -> the reference as written (`@inferer#sw_batch_size`)

    def unparse(self, node: ast.AST) -> str:
        """Source of `node` with the placeholders turned back into references."""
        text = ast.unparse(node)
        for name, original in self.texts.items():
            text = text.replace(name, original)
        return text


def _parse_expr(text: Any) -> _Expr | None:
    """Parse a `$` expression; None for anything else (plain strings, `$import` statements, bad syntax)."""
    if not isinstance(text, str) or not text.startswith("$"):
        return None
    refs: dict[str, str] = {}
    texts: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        name = f"__ref{len(refs)}__"
        refs[name], texts[name] = _norm(match.group(1)), match.group(0)
        return name

    try:
        tree = ast.parse(_REF.sub(placeholder, text[1:]).strip(), mode="eval").body
    except SyntaxError:
        return None
    return _Expr(tree, refs, texts)


def _refs_in(text: str) -> list[str]:
    return [_norm(m.group(1)) for m in _REF.finditer(text)]


def _root_ref(node: ast.AST, expr: _Expr) -> str | None:
    """The id `node` names when it is `@x`, `@x.to(...)`, `@x.eval()`...: the same module object as `@x`."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SAME_OBJECT_METHODS:
        node = node.func.value
    if isinstance(node, ast.Name) and node.id in expr.refs:
        return expr.refs[node.id]
    return None


def _same_object_parent(value: Any) -> str | None:
    """For a config value `@x` or `$@x.to(@device)`: `x`; else None."""
    if isinstance(value, str) and value.startswith("@") and _REF.fullmatch(value):
        return _norm(value[1:])
    expr = _parse_expr(value)
    return _root_ref(expr.tree, expr) if expr else None


def _alias_group(config: Mapping[str, Any], config_id: str) -> set[str]:
    """Top-level ids that name the same module object as `config_id` (through `.to(...)`-style chains)."""
    parent = {k: p for k in config if isinstance(k, str) and (p := _same_object_parent(config[k])) is not None}
    adjacency: dict[str, set[str]] = {}
    for child, par in parent.items():
        adjacency.setdefault(child, set()).add(par)
        adjacency.setdefault(par, set()).add(child)
    group, todo = {_norm(config_id)}, [_norm(config_id)]
    while todo:
        for nxt in adjacency.get(todo.pop(), ()):
            if nxt not in group:
                group.add(nxt)
                todo.append(nxt)
    return group


class _Unknown(Exception):
    """A condition whose value is not known without running the config."""


def _static_value(node: ast.AST, expr: _Expr, config: Mapping[str, Any]) -> Any:
    """Value of a constant, a reference to a literal config value, or `not` of those; else raises _Unknown."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _static_value(node.operand, expr, config)
    if isinstance(node, ast.Name) and node.id in expr.refs:
        value = _get(config, expr.refs[node.id])
        if value is _MISSING:
            raise _Unknown
        inner = _parse_expr(value)
        if inner is not None:
            return _static_value(inner.tree, inner, config)
        if isinstance(value, str) and value.startswith("@"):
            raise _Unknown
        return value
    raise _Unknown


def _live_nodes(node: ast.AST, expr: _Expr, config: Mapping[str, Any]) -> Iterator[ast.AST]:
    """Nodes of `node` that can run: `a if @flag else b` with a literal `flag` yields only the branch taken."""
    yield node
    if isinstance(node, ast.IfExp):
        yield from _live_nodes(node.test, expr, config)
        try:
            taken = node.body if _static_value(node.test, expr, config) else node.orelse
        except _Unknown:
            yield from _live_nodes(node.body, expr, config)
            yield from _live_nodes(node.orelse, expr, config)
            return
        yield from _live_nodes(taken, expr, config)
        return
    for child in ast.iter_child_nodes(node):
        yield from _live_nodes(child, expr, config)


def _disabled(node: Any) -> bool:
    """A component whose `_disabled_` is literally true (MONAI skips it)."""
    if not isinstance(node, Mapping) or "_disabled_" not in node:
        return False
    flag = node["_disabled_"]
    return flag is True or (isinstance(flag, str) and flag.strip().lower() in ("true", "$true"))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint loaders
# ----------------------------------------------------------------------------------------------------------------


class _LoaderWalker:
    """Follows references from the ids a run executes and records every active checkpoint loader it reaches."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.seen: set[str] = set()
        self.loaders: list[Loader] = []
        self.texts: list[str] = []  # every live string reached (for leftover zoo-engine checks)

    def visit(self, config_id: str) -> None:
        if config_id in self.seen:
            return
        self.seen.add(config_id)
        node = _get(self.config, config_id)
        if node is not _MISSING:
            self.walk(node, config_id)

    def walk(self, node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            if _disabled(node):
                return
            target = node.get("_target_")
            if isinstance(target, str) and _norm(target).replace("::", ".").split(".")[-1] == "CheckpointLoader":
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
        expr = _parse_expr(text)
        if expr is None:
            for ref in _refs_in(text):
                self.visit(ref)
            return
        for node in _live_nodes(expr.tree, expr, self.config):
            if isinstance(node, ast.Name) and node.id in expr.refs:
                self.visit(expr.refs[node.id])
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOAD_METHODS:
                target = _root_ref(node.func.value, expr)
                if target is not None:
                    self.loaders.append(Loader(where, node.func.attr, (target,), expr.unparse(node)))

    def _load_dict_targets(self, load_dict: Any) -> tuple[str, ...]:
        if isinstance(load_dict, str):
            referenced = _same_object_parent(load_dict)
            load_dict = _get(self.config, referenced) if referenced else _MISSING
        if not isinstance(load_dict, Mapping):
            return ()
        targets = []
        for value in load_dict.values():
            target = _same_object_parent(value)
            if target is not None:
                targets.append(target)
        return tuple(targets)


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
    walker = _LoaderWalker(config)
    for root in ROOT_IDS:
        walker.visit(root)
    if network_id is None:
        return walker.loaders
    group = _alias_group(config, network_id)
    return [loader for loader in walker.loaders if group & set(loader.targets)]


def _zoo_engine_leftovers(config: Mapping[str, Any]) -> list[str]:
    walker = _LoaderWalker(config)
    for root in ROOT_IDS:
        walker.visit(root)
    return sorted({t for t in walker.texts if "torch.jit.load(" in t or "trt_compile(" in t})


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def find_bundle_file(bundle_root: str | Path, stem: str, given: str | Path | None = None) -> Path:
    """`configs/<stem>.json|yaml|yml` of a bundle, or `given` (a relative path is looked up under the bundle root first,
    then under the current directory).

    Raises:
        ConversionError: the file does not exist.
    """
    root = Path(bundle_root)
    if given is not None:
        path = Path(given)
        if not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise ConversionError(f"{path} does not exist")
        return path
    for suffix in CONFIG_SUFFIXES:
        path = root / "configs" / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise ConversionError(f"no configs/{stem}.json or .yaml in bundle {root}")


def _load(path: Path) -> dict[str, Any]:
    from monai.bundle import ConfigParser  # monai is heavy; only when converting

    content = ConfigParser.load_config_file(str(path))
    if not isinstance(content, dict):
        raise ConversionError(f"{path} must hold a dict of config ids, got {type(content).__name__}")
    return content


def _merge(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """Merge raw configs key by key exactly as `python -m monai.bundle run --config_file "[a, b]"` does."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    parser = ConfigParser(config={})
    for config in configs:
        for key, value in copy.deepcopy(dict(config)).items():
            try:
                merge_kv(parser, key, value)
            except (KeyError, IndexError, ValueError, TypeError) as err:
                raise ConversionError(f"cannot merge key '{key}' onto the bundle config: {err}") from err
    return parser.get()


def _relative(path: Path | None, root: Path) -> str:
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def parse_trt_export_commands(readme: str) -> list[dict[str, Any]]:
    """Flags of every `python -m monai.bundle trt_export ...` command in a README (line continuations joined).

    Values are parsed as Python literals where they are (`"[1, 4, 8]"`, `"True"`, `"{'a': 1}"`), else kept as
    strings (`models/model_trt.ts`, `<fp32/fp16>`). Config overrides (`--network_def#use_list_output`) are kept
    under their own names.
    """
    text = re.sub(r"\\[ \t]*\r?\n", " ", readme)
    commands = []
    for line in text.splitlines():
        at = line.find("monai.bundle trt_export")
        if at < 0:
            continue
        try:
            tokens = shlex.split(line[at + len("monai.bundle trt_export"):].replace("`", " "))
        except ValueError:
            logger.warning("could not parse the trt_export command %r", line.strip())
            continue
        flags: dict[str, Any] = {}
        index = 0
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if not token.startswith("--"):
                continue
            name, eq, value = token[2:].partition("=")
            if not eq:
                if index < len(tokens) and not tokens[index].startswith("--"):
                    value, index = tokens[index], index + 1
                else:
                    value = "True"
            flags[name] = _flag_value(value)
        commands.append(flags)
    return commands


def _flag_value(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


# ----------------------------------------------------------------------------------------------------------------
# The conversion
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Target:
    """One patched network: its id, zoo style, entries and where they came from."""

    network: str
    style: str
    entries: list[dict[str, Any]] = field(default_factory=list)


class _Converter:
    """One conversion: reads both configs, maps every zoo key (or notes why not), assembles the patch."""

    def __init__(self, root: Path, inference_path: Path, trt_path: Path, readme: Path | None, method: str,
                 precision: str | None, keep: Sequence[str]) -> None:
        self.root, self.inference_path, self.trt_path, self.readme = root, inference_path, trt_path, readme
        self.method, self.precision, self.keep = method, precision, tuple(keep)
        self.inference = _load(inference_path)
        self.trt = _load(trt_path)
        self.mapped: list[str] = []
        self.unmapped: list[str] = []
        self.targets: dict[str, _Target] = {}
        self.consumed: set[str] = set()  # zoo keys that were mapped
        self.carried: list[str] = []  # zoo-only ids the entries reference
        self.sections: dict[str, str] = {}
        # the inference config plus ids only the zoo file defines (e.g. vista3d's `network_dev`): alias lookups
        extra = {k: v for k, v in self.trt.items() if k not in self.inference and "#" not in k and "::" not in k}
        self.aux = {**extra, **{k: v for k, v in self.inference.items()}}

    # -- entry points --------------------------------------------------------------------------------------------

    def run(self) -> tuple[dict[str, Any], list[str]]:
        if any("monai_trt.apply(" in json.dumps(v) for v in self.trt.values()):
            raise ConversionError(f"{self.trt_path} is already a monai_trt patch (it calls monai_trt.apply); check it "
                                  "with monai_trt.bundle.zoo.check_patch instead of converting it")
        styles = []
        for key, value in self.trt.items():
            if isinstance(value, str) and "trt_compile(" in value:
                self._trt_compile_key(key, value)
                styles.append("trt_compile")
            elif isinstance(value, str) and "torch.jit.load(" in value:
                self._torch_tensorrt_key(key, value)
                styles.append("torch_tensorrt")
        if not self.targets:
            raise ConversionError(
                f"{self.trt_path} is not a model-zoo TensorRT config: no id is set by trt_compile(...) or "
                "torch.jit.load(...), so there is nothing to convert"
            )
        self.carried = self._referenced_zoo_ids()
        self._other_keys()
        return self._assemble(), sorted(set(styles), key=styles.index)

    def _referenced_zoo_ids(self) -> list[str]:
        """Ids only the zoo file defines that the converted entries reference (e.g. a `max_prompt_size`)."""
        carried: list[str] = []
        todo = [json.dumps([t.entries for t in self.targets.values()])]
        while todo:
            for ref in _refs_in(todo.pop()):
                top = ref.split("::")[0]
                if top in self.trt and top not in self.inference and top not in self.consumed and top not in carried:
                    carried.append(top)
                    todo.append(json.dumps(self.trt[top]))
                    self.mapped.append(f"'{top}': carried over (the converted entries reference it)")
        return carried

    # -- trt_compile style ----------------------------------------------------------------------------------------

    def _trt_compile_key(self, key: str, value: str) -> None:
        self.consumed.add(key)
        expr = _parse_expr(value)
        if expr is None:
            raise ConversionError(f"'{key}': cannot parse the expression {value!r}")
        calls = list(self._trt_compile_calls(key, expr.tree, expr))
        if not calls:
            self.unmapped.append(f"'{key}': {value} — its trt_compile call is never taken (the condition is "
                                 "false in the zoo file), so nothing is converted for it")
            return
        for call in calls:
            self._map_trt_compile_call(key, call, expr)

    def _trt_compile_calls(self, key: str, node: ast.AST, expr: _Expr) -> Iterator[ast.Call]:
        if isinstance(node, ast.IfExp) and "trt_compile(" in expr.unparse(node.body) + expr.unparse(node.orelse):
            try:
                taken = node.body if _static_value(node.test, expr, {**self.aux, **self.trt}) else node.orelse
            except _Unknown:
                raise ConversionError(
                    f"'{key}': trt_compile is called under a condition that is not a literal "
                    f"({expr.unparse(node.test)}); convert by hand or make the condition a literal id"
                ) from None
            self.mapped.append(f"'{key}': condition {expr.unparse(node.test)} evaluated from the zoo file")
            yield from self._trt_compile_calls(key, taken, expr)
            return
        func = node.func if isinstance(node, ast.Call) else None
        if (isinstance(func, ast.Name) and func.id == "trt_compile") or (
                isinstance(func, ast.Attribute) and func.attr == "trt_compile"):
            yield node  # type: ignore[misc]
            return
        for child in ast.iter_child_nodes(node):
            yield from self._trt_compile_calls(key, child, expr)

    def _map_trt_compile_call(self, key: str, call: ast.Call, expr: _Expr) -> None:
        if not call.args:
            raise ConversionError(f"'{key}': trt_compile(...) without a module argument")
        root = _root_ref(call.args[0], expr)
        if root is None:
            raise ConversionError(f"'{key}': trt_compile's module {expr.unparse(call.args[0])!r} is not a config "
                                  "reference such as @network_def.to(@device); cannot tell which network it wraps")
        network = self._pick_target(key, root)
        keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg}
        args_node = keywords.pop("args", call.args[2] if len(call.args) > 2 else None)
        submodule_node = keywords.pop("submodule", call.args[3] if len(call.args) > 3 else None)
        keywords.pop("logger", None)
        if keywords:
            self.unmapped.append(f"'{key}': trt_compile keyword(s) {sorted(keywords)} not known; dropped")
        base = expr.unparse(call.args[1]) if len(call.args) > 1 else "?"
        self.unmapped.append(
            f"'{key}': base_path {base} dropped: engines go to the monai_trt cache (env MONAI_TRT_CACHE), keyed by "
            "content, not next to the checkpoint"
        )
        args = self._args_dict(key, args_node, expr)
        submodule = self._submodule(key, submodule_node, expr)
        entry = self._entry_from_args(key, args, submodule)
        self._add_entry(network, "trt_compile", entry, f"'{key}': trt_compile on @{network}"
                        + (f" submodule {submodule!r}" if submodule else " (whole network)"))

    def _args_dict(self, key: str, node: ast.AST | None, expr: _Expr) -> dict[str, Any]:
        if node is None or (isinstance(node, ast.Constant) and node.value is None):
            return {}
        if isinstance(node, ast.Name) and node.id in expr.refs:
            args_id = expr.refs[node.id]
            value = _get(self.trt, args_id)
            if value is _MISSING:
                value = _get(self.inference, args_id)
            if not isinstance(value, Mapping):
                raise ConversionError(f"'{key}': trt_compile args @{args_id} is not a dict in the configs ({value!r})")
            self.consumed.add(args_id.split("::")[0])
            return dict(value)
        if isinstance(node, ast.Dict):
            out = {}
            for k, v in zip(node.keys, node.values):
                if not isinstance(k, ast.Constant) or not isinstance(k.value, str):
                    raise ConversionError(f"'{key}': trt_compile args has a non-string key")
                out[k.value] = self._config_value(v, expr)
            return out
        raise ConversionError(f"'{key}': trt_compile args {expr.unparse(node)!r} is neither a dict nor a reference "
                              "to one; convert by hand")

    @staticmethod
    def _config_value(node: ast.AST, expr: _Expr) -> Any:
        try:
            return ast.literal_eval(node)
        except ValueError:
            return "$" + expr.unparse(node)

    def _submodule(self, key: str, node: ast.AST | None, expr: _Expr) -> str | list[str]:
        if node is None:
            return ""
        try:
            value = _static_value(node, expr, {**self.aux, **self.trt}) if not isinstance(node, ast.List) else \
                ast.literal_eval(node)
        except (_Unknown, ValueError):
            raise ConversionError(f"'{key}': submodule {expr.unparse(node)!r} is not a literal") from None
        if value is None:
            return ""
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            return value[0] if isinstance(value, list) and len(value) == 1 else value
        raise ConversionError(f"'{key}': submodule must be a string or a list of strings, got {value!r}")

    def _entry_from_args(self, key: str, args: dict[str, Any], submodule: str | list[str]) -> dict[str, Any]:
        entry: dict[str, Any] = {"submodule": submodule}
        for name, value in args.items():
            if name in DROPPED_ARGS:
                self.unmapped.append(f"'{key}': args.{name} dropped ({DROPPED_ARGS[name]})")
            elif name in CARRIED_ARGS:
                entry[name] = _simplify(value)
            else:
                self.unmapped.append(f"'{key}': args.{name} is not a trt_compile argument; dropped")
        if "input_names" in args and entry.get("input_profiles"):
            self.unmapped.append(f"'{key}': input_profiles are keyed by the zoo's input_names {args['input_names']}; "
                                 "rename their keys to the forward's argument names")
        if isinstance(entry.get("export_args"), Mapping):
            dropped = sorted(set(entry["export_args"]) & set(IGNORED_ZOO_EXPORT_ARGS))
            entry["export_args"] = {k: v for k, v in entry["export_args"].items() if k not in dropped}
            if dropped:
                self.unmapped.append(f"'{key}': export_args {dropped} dropped (MONAI convert_to_onnx options; the "
                                     "export here is torch.onnx.export(dynamo=True), validated against PyTorch)")
            if not entry["export_args"]:
                del entry["export_args"]
        if "output_names" in entry:
            self.mapped.append(f"'{key}': output_names kept; they only name the ONNX outputs here (trt_compile "
                               "returned a dict keyed by them; monai_trt keeps the forward's own output structure)")
        self._precision(entry, key, entry.pop("precision", None), f"args.precision or trt_compile's default "
                        f"{ZOO_DEFAULT_PRECISION}", ZOO_DEFAULT_PRECISION)
        zoo_method = entry.pop("method", None) or ZOO_DEFAULT_METHOD
        self._method(entry, key, zoo_method, "args.method" if "method" in args else "trt_compile's default")
        if "build_args" not in args and entry["method"] in ("onnx", "auto"):  # TensorRT's builder option
            entry["build_args"] = dict(ZOO_DEFAULT_BUILD_ARGS)
            self.mapped.append(f"'{key}': build_args {ZOO_DEFAULT_BUILD_ARGS} (trt_compile's default optimisation "
                               "level; monai_trt's own default is 3)")
        elif "build_args" in args:
            self.mapped.append(f"'{key}': build_args merged over the backend defaults (trt_compile replaced them)")
        if "fallback" not in args:
            self.mapped.append(f"'{key}': fallback left at monai_trt's default true (TrtCompiler's is false): a failed "
                               "build runs PyTorch with one warning instead of failing the run")
        return entry

    # -- torch_tensorrt style -------------------------------------------------------------------------------------

    def _torch_tensorrt_key(self, key: str, value: str) -> None:
        self.consumed.add(key)
        replaced = _norm(key.lstrip("+"))
        consumer = self._consumer_of(replaced)
        ts_path = " ".join(p.lstrip("/") for p in re.findall(r"['\"]([^'\"]*\.ts)['\"]", value)) or value
        self.unmapped.append(f"'{key}': the pre-exported engine {ts_path} (weights baked in by trt_export) is not "
                             f"used; @{consumer} is the bundle's own network with its own checkpoint loading")
        flags = self._trt_export_flags(ts_path, replaced)
        entry: dict[str, Any] = {"submodule": ""}
        if flags and "precision" not in flags:
            self._precision(entry, key, None, "trt_export's default", "fp32")
        else:
            self._precision(entry, key, flags.get("precision"), "trt_export --precision", None)
        use_onnx = flags.get("use_onnx") in (True, "True", "true")
        self._method(entry, key, "onnx" if use_onnx else "torch_trt",
                     "trt_export --use_onnx True" if use_onnx else "trt_export without --use_onnx (Torch-TensorRT)")
        if flags.get("dynamic_batchsize") is not None:
            entry["dynamic_batchsize"] = flags["dynamic_batchsize"]
            self.mapped.append(f"'{key}': dynamic_batchsize {flags['dynamic_batchsize']} from trt_export")
        converter_kwargs = flags.get("converter_kwargs") or {}
        if isinstance(converter_kwargs, Mapping):
            self._converter_kwargs(entry, key, dict(converter_kwargs))
        notes = {
            "use_trace": "monai_trt exports with torch.export / torch.onnx(dynamo=True), never jit.trace; a network "
                         "with data-dependent Python control flow fails that export and runs in PyTorch (one warning)",
            "input_shape": "engines are built for the shapes of the real calls (plus dynamic_batchsize)",
            "onnx_input_names": "inputs are named after the forward's arguments",
            "onnx_output_names": "outputs keep the forward's structure; names are cosmetic",
            "device": "engines are built on the device of the network",
            "key_in_ckpt": "weights come from the bundle's checkpoint loader",
            "args_file": "not read; pass its flags to the converter options instead",
        }
        for name, why in notes.items():
            if name in flags:
                self.unmapped.append(f"'{key}': trt_export --{name} {flags[name]!r} not mapped: {why}")
        for name in flags:
            if "#" in name or "::" in name:
                self.unmapped.append(f"'{key}': trt_export config override --{name} {flags[name]!r} applied only at "
                                     "export; not carried (the patch runs the network as inference.json defines it)")
        self._add_entry(consumer, "torch_tensorrt", entry, f"'{key}': torch.jit.load replaced @{replaced}; patching "
                        f"@{consumer}, the network the run uses")

    def _trt_export_flags(self, ts_path: str, replaced: str) -> dict[str, Any]:
        readme = self.readme
        if readme is None or not readme.is_file():
            self.unmapped.append("no README found (docs/README.md): trt_export flags unknown; precision, method and "
                                 "dynamic batch use the converter's options and defaults")
            return {}
        commands = parse_trt_export_commands(readme.read_text(encoding="utf-8", errors="replace"))
        if not commands:
            self.unmapped.append(f"{_relative(readme, self.root)} documents no trt_export command: precision, method "
                                 "and dynamic batch use the converter's options and defaults")
            return {}
        name = ts_path.strip().lstrip("./")
        matching = [c for c in commands if isinstance(c.get("filepath"), str) and name.endswith(
            str(c["filepath"]).strip().lstrip("./"))]
        if not matching and len(commands) == 1:
            matching = commands
            self.unmapped.append(f"the README's trt_export writes {commands[0].get('filepath')!r}, not {ts_path!r}; "
                                 "its flags are used anyway (the only trt_export command)")
        if not matching:
            self.unmapped.append(f"no trt_export command in the README writes {ts_path!r}: flags unknown")
            return {}
        flags = matching[0]
        self.mapped.append(f"trt_export flags read from {_relative(readme, self.root)}: "
                           + " ".join(f"--{k} {v!r}" for k, v in flags.items()))
        if flags.get("net_id") not in (None, replaced):
            self.unmapped.append(f"trt_export --net_id {flags['net_id']!r} differs from the replaced id {replaced!r}")
        if flags.get("ckpt_file"):
            self.mapped.append(f"the zoo engine was exported from {flags['ckpt_file']}; the patch builds its engine "
                               "from the weights the bundle's loader puts into the network at run time")
        return flags

    def _converter_kwargs(self, entry: dict[str, Any], key: str, kwargs: dict[str, Any]) -> None:
        build_args: dict[str, Any] = {}
        if "truncate_long_and_double" in kwargs:
            value = kwargs.pop("truncate_long_and_double")
            if entry["method"] in ("torch_trt", "auto"):
                build_args["truncate_double"] = bool(value)
                self.mapped.append(f"'{key}': converter_kwargs truncate_long_and_double -> build_args truncate_double")
            else:
                self.unmapped.append(f"'{key}': converter_kwargs truncate_long_and_double has no counterpart for "
                                     f"method {entry['method']}")
        for name, value in kwargs.items():
            self.unmapped.append(
                f"'{key}': trt_export --converter_kwargs {name}={value!r} not mapped (Torch-TensorRT TorchScript "
                "frontend option; monai_trt compiles a torch.export program; for op names use build_args "
                "torch_executed_ops with method torch_trt)"
            )
        if build_args:
            entry["build_args"] = {**entry.get("build_args", {}), **build_args}

    # -- shared --------------------------------------------------------------------------------------------------

    def _precision(self, entry: dict[str, Any], key: str, zoo: Any, source: str, default: str | None) -> None:
        if self.precision is not None:
            entry["precision"] = self.precision
            self.mapped.append(f"'{key}': precision {self.precision} (converter option; zoo: {zoo or default})")
            return
        if isinstance(zoo, str) and zoo.lower() in PRECISIONS:
            entry["precision"] = zoo.lower()
            self.mapped.append(f"'{key}': precision {zoo.lower()} from {source}")
        elif isinstance(zoo, str) and zoo.startswith("$"):
            entry["precision"] = zoo
            self.mapped.append(f"'{key}': precision {zoo} (expression, resolved at run time)")
        elif zoo is None and default is not None:
            entry["precision"] = default
            self.mapped.append(f"'{key}': precision {default} ({source})")
        elif zoo is not None and not (isinstance(zoo, str) and zoo.startswith("<")):
            raise ConversionError(f"'{key}': precision {zoo!r} ({source}) is not one of {list(PRECISIONS)}")
        else:
            entry["precision"] = "fp16"
            given = f"{source} is {zoo!r}" if zoo is not None else "no trt_export command documented"
            self.unmapped.append(f"'{key}': precision not fixed by the zoo ({given}); fp16 chosen, pass "
                                 "precision='fp32' to the converter for fp32")

    def _method(self, entry: dict[str, Any], key: str, zoo: str, source: str) -> None:
        if self.method != "keep":
            entry["method"] = self.method
            self.mapped.append(f"'{key}': method {self.method} (converter option; zoo: {zoo} from {source})")
            return
        if zoo not in METHODS:
            raise ConversionError(f"'{key}': zoo method {zoo!r} is not one of {list(METHODS)}")
        entry["method"] = zoo
        self.mapped.append(f"'{key}': method {zoo} from {source} (where it is not available, the entry warns once "
                           "and runs PyTorch; convert with method='auto' to use the best engine of each machine)")

    def _consumer_of(self, replaced: str) -> str:
        """The id the run uses for the module the zoo replaced (`network` for `network_def`)."""
        evaluator_net = self._evaluator_network()
        candidates = [c for c in (evaluator_net, "network") if c and _get(self.inference, c) is not _MISSING]
        if not candidates:
            raise ConversionError(
                f"cannot tell which id the run uses as its network: no evaluator with a 'network' reference and no "
                f"'network' id in {self.inference_path.name}; the zoo file replaced @{replaced}"
            )
        consumer = candidates[0]
        if replaced not in _alias_group(self.inference, consumer):
            raise ConversionError(
                f"the run uses @{consumer} as its network, which is not the module the zoo file replaced "
                f"(@{replaced}) or a .to(...) of it; cannot tell where monai_trt.apply should go"
            )
        return consumer

    def _evaluator_network(self) -> str | None:
        evaluator = self.inference.get("evaluator")
        if isinstance(evaluator, Mapping):
            return _same_object_parent(evaluator.get("network"))
        return None

    def _pick_target(self, key: str, root: str) -> str:
        group = _alias_group(self.aux, root)
        plain = _norm(key.lstrip("+"))
        if plain in self.inference and plain in group:
            return plain
        for candidate in (self._evaluator_network(), "network"):
            if candidate and candidate in group and candidate in self.inference:
                return candidate
        in_inference = sorted(g for g in group if g in self.inference)
        if len(in_inference) == 1:
            return in_inference[0]
        raise ConversionError(f"'{key}': trt_compile wraps @{root}, but no single id of {self.inference_path.name} "
                              f"names that module (candidates: {in_inference or 'none'})")

    def _add_entry(self, network: str, style: str, entry: dict[str, Any], what: str) -> None:
        self._filter_build_args(entry, what.split(":")[0])
        target = self.targets.setdefault(network, _Target(network, style))
        self._dynamic_batch(network, entry)
        self._training_mode(network)
        self._autoencoder(network, entry)
        target.entries.append(entry)
        self.mapped.append(what)

    @staticmethod
    def _accepted_build_args(method: str) -> set[str]:
        from monai_trt.backends import BACKENDS

        if method == "auto":
            return set().union(*(cls.default_build_args for cls in BACKENDS.values()))
        return set(BACKENDS[method].default_build_args)

    def _filter_build_args(self, entry: dict[str, Any], where: str) -> None:
        """Drop build_args the entry's method does not take (e.g. TensorRT options after --method onnxruntime)."""
        build_args = entry.get("build_args")
        if not isinstance(build_args, Mapping) or not isinstance(entry.get("method"), str):
            return
        unknown = sorted(set(build_args) - self._accepted_build_args(entry["method"]))
        if unknown:
            self.unmapped.append(f"{where}: build_args {unknown} are not options of method {entry['method']}; dropped")
            entry["build_args"] = {k: v for k, v in build_args.items() if k not in unknown}
        if not entry["build_args"]:
            del entry["build_args"]

    def _dynamic_batch(self, network: str, entry: dict[str, Any]) -> None:
        if entry.get("dynamic_batchsize") is not None or entry.get("input_profiles") or entry.get("submodule"):
            return
        evaluator = self.inference.get("evaluator")
        if not isinstance(evaluator, Mapping) or self._evaluator_network() not in _alias_group(self.inference, network):
            return
        inferer = _same_object_parent(evaluator.get("inferer"))
        config = _get(self.inference, inferer) if inferer else _MISSING
        if isinstance(config, Mapping) and "sw_batch_size" in config:
            ref = f"@{inferer.replace('::', '#')}#sw_batch_size"
            entry["dynamic_batchsize"] = f"$[1, {ref}, {ref}]"
            self.mapped.append(f"@{network}: dynamic_batchsize [1, sw_batch_size, sw_batch_size] from the sliding "
                               "window inferer (its last window batch may be smaller; one engine serves all)")

    def _training_mode(self, network: str) -> None:
        if network in (t.network for t in self.targets.values() if t.entries):
            return
        group = _alias_group(self.inference, network)
        if self._evaluator_network() in group:
            return  # MONAI evaluators put the network in eval mode
        text = json.dumps(self.inference)
        if any(re.search(rf"@{re.escape(g)}(?:\.\w+\([^()]*\))*\.eval\(\)", text.replace("#", "::")) for g in group):
            return
        self.unmapped.append(
            f"@{network} is never put in eval mode by the bundle (no evaluator, no .eval()); monai_trt runs modules "
            "in training mode in PyTorch, so no engine serves it until the bundle (or monai_trt) calls .eval()"
        )

    def _autoencoder(self, network: str, entry: dict[str, Any]) -> None:
        if entry.get("submodule"):
            return
        for alias in _alias_group(self.inference, network):
            target = _get(self.inference, f"{alias}::_target_")
            if isinstance(target, str) and ("Autoencoder" in target or "VQVAE" in target):
                self.unmapped.append(
                    f"@{network} ({target.split('.')[-1]}) is patched as a whole, as in the zoo file; latent "
                    "diffusion samplers call its decode()/decode_stage_2_outputs(), not forward(), so that entry "
                    "serves nothing: use submodule 'decoder' to accelerate decoding"
                )
                return

    def _other_keys(self) -> None:
        initialize = self.inference.get("initialize") if isinstance(self.inference.get("initialize"), list) else []
        imports = self.inference.get("imports") if isinstance(self.inference.get("imports"), list) else []
        for key, value in self.trt.items():
            plain = key.lstrip("+")
            if key in self.consumed or plain in self.consumed or key in self.carried:
                continue
            if key in self.keep:
                self.mapped.append(f"'{key}' kept verbatim (keep option)")
                continue
            if plain == "imports":
                extra = [i for i in value if i not in imports and not any(m in str(i) for m in TRT_IMPORT_MARKERS)]
                self.mapped.append(f"'{key}': replaced by +imports ['$import monai_trt'] (the bundle's imports stay)")
                if extra:
                    self.unmapped.append(f"'{key}': imports {extra} are not in the bundle's imports; not carried")
            elif plain == "initialize":
                missing = [i for i in value if i not in initialize]
                dropped = [i for i in initialize if i not in value]
                note = f"'{key}': not carried (the bundle's initialize stays and monai_trt.apply is appended to it)"
                if dropped:
                    note += f"; the zoo file's override would have dropped {dropped}"
                self.mapped.append(note)
                if missing:
                    self.unmapped.append(f"'{key}': lines {missing} are not in the bundle's initialize; not carried")
            elif _norm(key).endswith("::_disabled_"):
                component = _norm(key)[: -len("::_disabled_")]
                loader = _get(self.inference, f"{component}::_target_")
                is_loader = isinstance(loader, str) and loader.endswith("CheckpointLoader")
                why = (" — it disables the bundle's CheckpointLoader, which the zoo engine did not need but the "
                       "patched network does") if is_loader else ""
                self.mapped.append(f"'{key}': {value!r} not carried{why}")
            elif _norm(key).endswith("::amp"):
                self.mapped.append(f"'{key}': {value!r} not carried: the zoo turned AMP off for its pre-built engine; "
                                   "monai_trt engines run at the entry's precision and return PyTorch's dtypes, and "
                                   "PyTorch fallbacks keep the bundle's AMP setting")
            else:
                self.unmapped.append(f"'{key}': {json.dumps(value)} not carried (a setting of the zoo's TensorRT run; "
                                     "pass keep=['" + key + "'] to carry it, or set it on the command line)")

    def _assemble(self) -> dict[str, Any]:
        patch: dict[str, Any] = {}
        patch["+imports" if isinstance(self.inference.get("imports"), list) else "imports"] = ["$import monai_trt"]
        patch[SWITCH_ID] = True
        applies = []
        sections: dict[str, str] = {}
        for network, target in self.targets.items():
            if not target.entries:
                continue
            section = "trt_patch" if network == "network" else "trt_patch_" + network.replace("::", "_")
            sections[network] = section
            patch[section] = target.entries
            applies.append(f"$monai_trt.apply(@{network.replace('::', '#')}, @{section}, enabled=@{SWITCH_ID})")
        if not applies:
            raise ConversionError(f"{self.trt_path}: no trt_compile call is taken, so there is nothing to patch")
        taken = sorted(k for k in patch if not k.startswith("+") and k in self.inference and k != "imports")
        if taken:
            raise ConversionError(f"{self.inference_path.name} already defines {taken}, which the patch would replace; "
                                  "rename them in the bundle or convert by hand")
        for key in self.carried:
            patch[key] = self.trt[key]
        for key in self.keep:
            if key not in self.trt:
                raise ConversionError(f"keep: '{key}' is not a key of {self.trt_path.name}")
            patch[key] = self.trt[key]
        patch["+initialize" if isinstance(self.inference.get("initialize"), list) else "initialize"] = applies
        self.sections = sections
        return patch


def _simplify(value: Any) -> Any:
    """`"$True"` -> True, `"$None"` -> None; everything else unchanged."""
    if isinstance(value, str) and value.strip() in ("$True", "$False", "$None"):
        return {"$True": True, "$False": False, "$None": None}[value.strip()]
    return value


# ----------------------------------------------------------------------------------------------------------------
# Validation and the safety checks
# ----------------------------------------------------------------------------------------------------------------


def _apply_calls(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(network id, patch section id) of each `monai_trt.apply(@a, @b, ...)` the run executes."""
    found = []
    for root in ROOT_IDS:
        items = config.get(root)
        for item in items if isinstance(items, list) else [items]:
            expr = _parse_expr(item)
            if expr is None:
                continue
            for node in ast.walk(expr.tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "apply"
                        and "monai_trt" in ast.unparse(node.func.value) and len(node.args) >= 2):
                    network, section = _root_ref(node.args[0], expr), _root_ref(node.args[1], expr)
                    if network and section:
                        found.append((network, section))
    return found


def _resolve_section(merged: Mapping[str, Any], section: str, root: Path) -> Any:
    """The section with `$`/`@` values resolved against the merged config (raises what MONAI raises)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(dict(merged)))
    parser["bundle_root"] = str(root)
    return parser.get_parsed_content(section)


def _static_entries(entries: Any) -> Any:
    """Entries with every `$` expression value removed (they are checked once resolved, or at run time)."""
    if not isinstance(entries, list):
        return entries
    return [{k: v for k, v in e.items() if not (isinstance(v, str) and v.startswith(("$", "@")))}
            if isinstance(e, Mapping) else e for e in entries]


def _validate_section(merged: Mapping[str, Any], section: str, root: Path, notes: list[str]) -> None:
    """Validate one section with monai_trt's spec parser and the backends' build_args rules."""
    from monai_trt.backends import BACKENDS, get_backend, merge_build_args

    raw = merged.get(section)
    try:
        parse_patch(_static_entries(raw))
    except PatchError as err:
        raise ConversionError(f"'{section}' is not a valid trt_patch: {err}") from err
    try:
        resolved = _resolve_section(merged, section, root)
    except Exception as err:  # any config error: report it, the run will check again
        notes.append(f"'{section}': expressions not resolvable without running the bundle ({type(err).__name__}: "
                     f"{err}); monai_trt.apply checks them at run time")
        return
    try:
        entries = parse_patch(resolved)
        for entry in entries:
            if entry.method == "auto":
                accepted = set().union(*(cls.default_build_args for cls in BACKENDS.values()))
                unknown = sorted(set(entry.build_args) - accepted)
                if unknown:
                    raise PatchError(f"build_args {unknown} are not accepted by any method")
                continue
            backend = get_backend(entry.method)
            merge_build_args(backend, entry.build_args, strict=True)
            if entry.precision not in backend.precisions:
                raise PatchError(f"method '{entry.method}' does not support precision '{entry.precision}'")
    except PatchError as err:
        raise ConversionError(f"'{section}' is not a valid trt_patch: {err}") from err


def _check_merged(plain: Mapping[str, Any], merged: Mapping[str, Any], what: str) -> dict[str, list[Loader]]:
    """Refuse a merged config that patches a network without loading its checkpoint, or keeps a zoo engine.

    Returns:
        network id -> the loaders that load it in the merged config.
    """
    calls = _apply_calls(merged)
    if not calls:
        raise ConversionError(f"{what}: no monai_trt.apply(@network, @trt_patch, ...) in initialize/run")
    leftovers = _zoo_engine_leftovers(merged)
    if leftovers:
        raise ConversionError(f"{what}: the merged config still uses the zoo's engine: {leftovers}; the network "
                              "must be the bundle's own (drop the network_def/network override)")
    loaders: dict[str, list[Loader]] = {}
    for network, section in calls:
        if section not in merged:
            raise ConversionError(f"{what}: monai_trt.apply names @{section}, which the config does not define")
        kept = find_checkpoint_loaders(merged, network)
        before = find_checkpoint_loaders(plain, network)
        lost = [b for b in before if b not in kept]
        if lost:
            raise ConversionError(
                f"{what} drops checkpoint loading of @{network} that the plain run has: "
                + "; ".join(b.describe() for b in lost)
                + ". The network would run on random weights (e.g. a zoo 'initialize' or 'handlers#0#_disabled_' "
                "override was carried over); remove those overrides"
            )
        if not kept:
            raise ConversionError(
                f"{what}: nothing loads a checkpoint into @{network}: no CheckpointLoader (handler or called from "
                "initialize) and no load_state_dict reached from initialize/run loads it or a .to(...) alias of it. "
                "The zoo's TensorRT engine carried its own weights; this patch would run the network on random "
                "weights. Add the bundle's checkpoint loading to its inference config, then convert again"
            )
        loaders[network] = kept
    return loaders


def check_patch(bundle_root: str | Path, patch: str | Path | Mapping[str, Any],
                inference_file: str | Path | None = None) -> dict[str, list[Loader]]:
    """Check a monai_trt patch file against a bundle: the weights it patches are still loaded from the checkpoint.

    Merges the bundle's inference config with `patch` as `monai.bundle run` does and raises when a network given to
    `monai_trt.apply` is not loaded from a checkpoint, loses a loader the plain run has, or is still the zoo's
    pre-exported engine (`torch.jit.load`, `trt_compile`).

    Args:
        bundle_root: the bundle directory.
        patch: the patch file (path, relative to the bundle root or absolute) or its dict.
        inference_file: the inference config (default `configs/inference.json|yaml`).

    Returns:
        network id -> the checkpoint loaders that load it.

    Raises:
        ConversionError: with what is missing.
    """
    root = Path(bundle_root)
    inference_path = find_bundle_file(root, "inference", inference_file)
    plain = _load(inference_path)
    if isinstance(patch, Mapping):
        content, what = dict(patch), "the patch"
    else:
        path = find_bundle_file(root, Path(patch).stem, patch)
        content, what = _load(path), str(path)
    merged = _merge(plain, content)
    loaders = _check_merged(_merge(plain), merged, what)
    for _, section in _apply_calls(merged):
        _validate_section(merged, section, root, [])
    return loaders


def convert_bundle(
    bundle_root: str | Path,
    out: str | Path | None = None,
    *,
    trt_file: str | Path | None = None,
    inference_file: str | Path | None = None,
    readme: str | Path | None = None,
    method: str = "keep",
    precision: str | None = None,
    keep: Sequence[str] = (),
    force: bool = False,
    dry_run: bool = False,
) -> Conversion:
    """Convert a bundle's model-zoo TensorRT config into a monai_trt patch file.

    Args:
        bundle_root: the bundle directory.
        out: where to write the patch (relative to the bundle root or absolute); default
            `configs/inference_monai_trt.json`. A `.yaml`/`.yml` name writes YAML.
        trt_file: the zoo TensorRT config (default `configs/inference_trt.json|yaml`).
        inference_file: the config the patch merges onto (default `configs/inference.json|yaml`).
        readme: where the `trt_export` command is documented (default `docs/README.md`, else `README.md`).
        method: `keep` (the zoo's meaning: `trt_compile`'s method or `onnx`; `trt_export --use_onnx` -> `onnx`, else
            `torch_trt`), or one of auto, onnx, torch_trt, aoti, onnxruntime for every entry.
        precision: precision for every entry; default: the zoo's (`trt_compile` args or default fp16; the README's
            `trt_export --precision`, fp16 where it leaves the choice open).
        keep: zoo file keys to carry over verbatim (e.g. `["force_sliding_window"]`); the safety checks still apply.
        force: overwrite an existing `out`.
        dry_run: convert and check, write nothing.

    Returns:
        The patch, what was mapped and what not, and the checkpoint loaders that stay.

    Raises:
        ConversionError: missing files, a file that is not a zoo TensorRT config, an expression that cannot be
            mapped, an invalid resulting entry, or a merged config that would not load the checkpoint into every
            patched network (nothing is written then).
    """
    root = Path(bundle_root)
    if not root.is_dir():
        raise ConversionError(f"bundle root {root} is not a directory")
    if method != "keep" and method not in METHODS:
        raise ConversionError(f"method must be 'keep' or one of {list(METHODS)}, got {method!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ConversionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if isinstance(keep, str):
        keep = [keep]
    inference_path = find_bundle_file(root, "inference", inference_file)
    trt_path = find_bundle_file(root, "inference_trt", trt_file)
    if readme is not None:
        readme_path: Path | None = Path(readme) if Path(readme).is_absolute() else root / readme
    else:
        readme_path = next((p for p in (root / "docs" / "README.md", root / "README.md") if p.is_file()), None)
    converter = _Converter(root, inference_path, trt_path, readme_path, method, precision, keep)
    patch, styles = converter.run()

    plain = _merge(converter.inference)
    merged = _merge(converter.inference, patch)
    loaders = _check_merged(plain, merged, "the converted patch")
    for _, section in _apply_calls(merged):
        _validate_section(merged, section, root, converter.unmapped)

    target = Path(out) if out is not None else Path(DEFAULT_OUT)
    target = target if target.is_absolute() else root / target
    conversion = Conversion(patch, tuple(styles), dict(converter.sections), loaders, converter.mapped,
                            converter.unmapped, trt_path, inference_path, None, root)
    if dry_run:
        return conversion
    if target.exists() and not force and target.resolve() != trt_path.resolve():
        raise ConversionError(f"{target} exists; pass force=True (--force) to overwrite it")
    if target.exists() and not force:
        raise ConversionError(f"{target} is the zoo file being converted; pass force=True (--force) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.suffix in (".yaml", ".yml"):
        import yaml

        target.write_text(yaml.safe_dump(patch, sort_keys=False), encoding="utf-8")
    else:
        target.write_text(json.dumps(patch, indent=2) + "\n", encoding="utf-8")
    conversion.out = target
    logger.info("wrote %s (%d mapped, %d not mapped)", target, len(conversion.mapped), len(conversion.unmapped))
    return conversion
