"""The `trt_compile` zoo style: an id overridden by `$trt_compile(<module>, <base_path>, args=..., submodule=...)`.

Each `trt_compile` call the zoo file takes becomes one entry on the network it wraps; its `args` are mapped key by
key (MONAI 1.6.1 `monai/networks/trt_compiler.py` defaults where they are not set).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from typing import Any

from monai_trt.bundle.zoo.configs import MISSING, ConversionError, lookup, norm
from monai_trt.bundle.zoo.entries import Converter
from monai_trt.bundle.zoo.expressions import Expr, Unknown, alias_group, parse_expr, root_ref, static_value
from monai_trt.patch.spec import IGNORED_ZOO_EXPORT_ARGS

# `trt_compile`'s own defaults where `args` does not set them.
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
_DOLLAR_LITERALS = {"$True": True, "$False": False, "$None": None}


def map_trt_compile(conv: Converter, key: str, value: str) -> None:
    """Map zoo key `key`, whose value calls `trt_compile`, into entries of `conv`.

    Raises:
        ConversionError: an expression that cannot be mapped (see the message).
    """
    conv.consumed.add(key)
    expr = parse_expr(value)
    if expr is None:
        raise ConversionError(f"'{key}': cannot parse the expression {value!r}")
    calls = list(_taken_calls(conv, key, expr.tree, expr))
    if not calls:
        conv.unmapped.append(f"'{key}': {value} — its trt_compile call is never taken (the condition is "
                             "false in the zoo file), so nothing is converted for it")
    for call in calls:
        _map_call(conv, key, call, expr)


def _taken_calls(conv: Converter, key: str, node: ast.AST, expr: Expr) -> Iterator[ast.Call]:
    """The `trt_compile(...)` calls in `node` on the branches its literal conditions take."""
    if isinstance(node, ast.IfExp) and "trt_compile(" in expr.unparse(node.body) + expr.unparse(node.orelse):
        try:
            taken = node.body if static_value(node.test, expr, conv.literals) else node.orelse
        except Unknown:
            raise ConversionError(
                f"'{key}': trt_compile is called under a condition that is not a literal "
                f"({expr.unparse(node.test)}); convert by hand or make the condition a literal id"
            ) from None
        conv.mapped.append(f"'{key}': condition {expr.unparse(node.test)} evaluated from the zoo file")
        yield from _taken_calls(conv, key, taken, expr)
    elif isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Name) and node.func.id == "trt_compile")
            or (isinstance(node.func, ast.Attribute) and node.func.attr == "trt_compile")):
        yield node
    else:
        for child in ast.iter_child_nodes(node):
            yield from _taken_calls(conv, key, child, expr)


def _map_call(conv: Converter, key: str, call: ast.Call, expr: Expr) -> None:
    if not call.args:
        raise ConversionError(f"'{key}': trt_compile(...) without a module argument")
    root = root_ref(call.args[0], expr)
    if root is None:
        raise ConversionError(f"'{key}': trt_compile's module {expr.unparse(call.args[0])!r} is not a config "
                              "reference such as @network_def.to(@device); cannot tell which network it wraps")
    network = _wrapped_network(conv, key, root)
    keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg}
    args_node = keywords.pop("args", call.args[2] if len(call.args) > 2 else None)
    submodule_node = keywords.pop("submodule", call.args[3] if len(call.args) > 3 else None)
    keywords.pop("logger", None)
    if keywords:
        conv.unmapped.append(f"'{key}': trt_compile keyword(s) {sorted(keywords)} not known; dropped")
    base = expr.unparse(call.args[1]) if len(call.args) > 1 else "?"
    conv.unmapped.append(
        f"'{key}': base_path {base} dropped: engines go to the monai_trt cache (env MONAI_TRT_CACHE), keyed by "
        "content, not next to the checkpoint"
    )
    args = _args_dict(conv, key, args_node, expr)
    submodule = _submodule(conv, key, submodule_node, expr)
    entry = _entry_from_args(conv, key, args, submodule)
    conv.add_entry(network, key, entry, f"'{key}': trt_compile on @{network}"
                   + (f" submodule {submodule!r}" if submodule else " (whole network)"))


def _wrapped_network(conv: Converter, key: str, root: str) -> str:
    """The id of the inference config that names the module `trt_compile` wraps (`root` or an alias of it)."""
    group = alias_group(conv.aux, root)
    plain = norm(key.lstrip("+"))
    if plain in conv.inference and plain in group:
        return plain
    for candidate in (conv.evaluator_network(), "network"):
        if candidate and candidate in group and candidate in conv.inference:
            return candidate
    in_inference = sorted(g for g in group if g in conv.inference)
    if len(in_inference) == 1:
        return in_inference[0]
    raise ConversionError(f"'{key}': trt_compile wraps @{root}, but no single id of {conv.inference_path.name} "
                          f"names that module (candidates: {in_inference or 'none'})")


def _args_dict(conv: Converter, key: str, node: ast.AST | None, expr: Expr) -> dict[str, Any]:
    """`trt_compile`'s `args`: a dict literal or a reference to a dict of either config."""
    if node is None or (isinstance(node, ast.Constant) and node.value is None):
        return {}
    args_id = expr.ref(node)
    if args_id is not None:
        value = lookup(conv.trt, args_id)
        if value is MISSING:
            value = lookup(conv.inference, args_id)
        if not isinstance(value, Mapping):
            raise ConversionError(f"'{key}': trt_compile args @{args_id} is not a dict in the configs ({value!r})")
        conv.consumed.add(args_id.split("::")[0])
        return dict(value)
    if isinstance(node, ast.Dict):
        out = {}
        for k, v in zip(node.keys, node.values):
            if not isinstance(k, ast.Constant) or not isinstance(k.value, str):
                raise ConversionError(f"'{key}': trt_compile args has a non-string key")
            try:
                out[k.value] = ast.literal_eval(v)
            except ValueError:
                out[k.value] = "$" + expr.unparse(v)  # an expression: resolved when the patch is parsed
        return out
    raise ConversionError(f"'{key}': trt_compile args {expr.unparse(node)!r} is neither a dict nor a reference "
                          "to one; convert by hand")


def _submodule(conv: Converter, key: str, node: ast.AST | None, expr: Expr) -> str | list[str]:
    """`trt_compile`'s `submodule` as an entry's: `""` for the whole network, a name, or a list of names."""
    if node is None:
        return ""
    try:
        value = ast.literal_eval(node) if isinstance(node, ast.List) else static_value(node, expr, conv.literals)
    except (Unknown, ValueError):
        raise ConversionError(f"'{key}': submodule {expr.unparse(node)!r} is not a literal") from None
    if value is None:
        return ""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)):
        return value[0] if isinstance(value, list) and len(value) == 1 else value
    raise ConversionError(f"'{key}': submodule must be a string or a list of strings, got {value!r}")


def _entry_from_args(conv: Converter, key: str, args: dict[str, Any], submodule: str | list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"submodule": submodule}
    for name, value in args.items():
        if name in DROPPED_ARGS:
            conv.unmapped.append(f"'{key}': args.{name} dropped ({DROPPED_ARGS[name]})")
        elif name in CARRIED_ARGS:
            entry[name] = _DOLLAR_LITERALS.get(value.strip(), value) if isinstance(value, str) else value
        else:
            conv.unmapped.append(f"'{key}': args.{name} is not a trt_compile argument; dropped")
    if "input_names" in args and entry.get("input_profiles"):
        conv.unmapped.append(f"'{key}': input_profiles are keyed by the zoo's input_names {args['input_names']}; "
                             "rename their keys to the forward's argument names")
    if isinstance(entry.get("export_args"), Mapping):
        dropped = sorted(set(entry["export_args"]) & set(IGNORED_ZOO_EXPORT_ARGS))
        entry["export_args"] = {k: v for k, v in entry["export_args"].items() if k not in dropped}
        if dropped:
            conv.unmapped.append(f"'{key}': export_args {dropped} dropped (MONAI convert_to_onnx options; the "
                                 "export here is torch.onnx.export(dynamo=True), validated against PyTorch)")
        if not entry["export_args"]:
            del entry["export_args"]
    if "output_names" in entry:
        conv.mapped.append(f"'{key}': output_names kept; they only name the ONNX outputs here (trt_compile "
                           "returned a dict keyed by them; monai_trt keeps the forward's own output structure)")
    conv.set_precision(entry, key, entry.pop("precision", None), f"args.precision or trt_compile's default "
                       f"{ZOO_DEFAULT_PRECISION}", ZOO_DEFAULT_PRECISION)
    zoo_method = entry.pop("method", None) or ZOO_DEFAULT_METHOD
    conv.set_method(entry, key, zoo_method, "args.method" if "method" in args else "trt_compile's default")
    if "build_args" not in args and entry["method"] in ("onnx", "auto"):  # TensorRT's builder option
        entry["build_args"] = dict(ZOO_DEFAULT_BUILD_ARGS)
        conv.mapped.append(f"'{key}': build_args {ZOO_DEFAULT_BUILD_ARGS} (trt_compile's default optimisation "
                           "level; monai_trt's own default is 3)")
    elif "build_args" in args:
        conv.mapped.append(f"'{key}': build_args merged over the backend defaults (trt_compile replaced them)")
    if "fallback" not in args:
        conv.mapped.append(f"'{key}': fallback left at monai_trt's default true (TrtCompiler's is false): a failed "
                           "build runs PyTorch with one warning instead of failing the run")
    return entry
