"""The `torch_tensorrt` zoo style: `network_def` replaced by `$torch.jit.load(<.ts>)`, an engine exported beforehand
by `python -m monai.bundle trt_export` with the weights baked in.

The engine is not used: the network the run uses is patched instead, with the precision, method and dynamic batch of
the `trt_export` command the bundle's README documents.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from monai_trt.bundle.zoo.configs import MISSING, ConversionError, lookup, norm, relative
from monai_trt.bundle.zoo.entries import Converter
from monai_trt.bundle.zoo.expressions import alias_group
from monai_trt.bundle.zoo.readme import parse_trt_export_commands

# `trt_export` flags with no counterpart here, and why.
UNMAPPED_FLAGS = {
    "use_trace": "monai_trt exports with torch.export first and traces (onnx/onnxruntime) only when that fails and "
                 "no Python decision of the forward reads an input value; otherwise PyTorch (one warning)",
    "input_shape": "engines are built for the shapes of the real calls (plus dynamic_batchsize)",
    "onnx_input_names": "inputs are named after the forward's arguments",
    "onnx_output_names": "outputs keep the forward's structure; names are cosmetic",
    "device": "engines are built on the device of the network",
    "key_in_ckpt": "weights come from the bundle's checkpoint loader",
    "args_file": "not read; pass its flags to the converter options instead",
}


def map_torch_tensorrt(conv: Converter, key: str, value: str) -> None:
    """Map zoo key `key`, whose value is a `torch.jit.load(...)` of an exported engine, into an entry of `conv`.

    Raises:
        ConversionError: the network the run uses is not the module the zoo file replaced, or a flag is invalid.
    """
    conv.consumed.add(key)
    replaced = norm(key.lstrip("+"))
    consumer = _consumer_of(conv, replaced)
    ts_path = " ".join(p.lstrip("/") for p in re.findall(r"['\"]([^'\"]*\.ts)['\"]", value)) or value
    conv.unmapped.append(f"'{key}': the pre-exported engine {ts_path} (weights baked in by trt_export) is not "
                         f"used; @{consumer} is the bundle's own network with its own checkpoint loading")
    flags = _trt_export_flags(conv, ts_path, replaced)
    entry: dict[str, Any] = {"submodule": ""}
    if flags and "precision" not in flags:
        conv.set_precision(entry, key, None, "trt_export's default", "fp32")
    else:
        conv.set_precision(entry, key, flags.get("precision"), "trt_export --precision", None)
    use_onnx = flags.get("use_onnx") in (True, "True", "true")
    conv.set_method(entry, key, "onnx" if use_onnx else "torch_trt",
                    "trt_export --use_onnx True" if use_onnx else "trt_export without --use_onnx (Torch-TensorRT)")
    if flags.get("dynamic_batchsize") is not None:
        entry["dynamic_batchsize"] = flags["dynamic_batchsize"]
        conv.mapped.append(f"'{key}': dynamic_batchsize {flags['dynamic_batchsize']} from trt_export")
    converter_kwargs = flags.get("converter_kwargs") or {}
    if isinstance(converter_kwargs, Mapping):
        _converter_kwargs(conv, entry, key, dict(converter_kwargs))
    for name, why in UNMAPPED_FLAGS.items():
        if name in flags:
            conv.unmapped.append(f"'{key}': trt_export --{name} {flags[name]!r} not mapped: {why}")
    for name in flags:
        if "#" in name or "::" in name:
            conv.unmapped.append(f"'{key}': trt_export config override --{name} {flags[name]!r} applied only at "
                                 "export; not carried (the patch runs the network as inference.json defines it)")
    conv.add_entry(consumer, key, entry, f"'{key}': torch.jit.load replaced @{replaced}; patching "
                   f"@{consumer}, the network the run uses")


def _consumer_of(conv: Converter, replaced: str) -> str:
    """The id the run uses for the module the zoo replaced (`network` for `network_def`)."""
    candidates = [c for c in (conv.evaluator_network(), "network") if c and lookup(conv.inference, c) is not MISSING]
    if not candidates:
        raise ConversionError(
            f"cannot tell which id the run uses as its network: no evaluator with a 'network' reference and no "
            f"'network' id in {conv.inference_path.name}; the zoo file replaced @{replaced}"
        )
    consumer = candidates[0]
    if replaced not in alias_group(conv.inference, consumer):
        raise ConversionError(
            f"the run uses @{consumer} as its network, which is not the module the zoo file replaced "
            f"(@{replaced}) or a .to(...) of it; cannot tell where monai_trt.apply should go"
        )
    return consumer


def _trt_export_flags(conv: Converter, ts_path: str, replaced: str) -> dict[str, Any]:
    """Flags of the README's `trt_export` command that wrote `ts_path` ({} where unknown, with a note)."""
    readme = conv.readme
    if readme is None or not readme.is_file():
        conv.unmapped.append("no README found (docs/README.md): trt_export flags unknown; precision, method and "
                             "dynamic batch use the converter's options and defaults")
        return {}
    commands = parse_trt_export_commands(readme.read_text(encoding="utf-8", errors="replace"))
    if not commands:
        conv.unmapped.append(f"{relative(readme, conv.root)} documents no trt_export command: precision, method "
                             "and dynamic batch use the converter's options and defaults")
        return {}
    name = ts_path.strip().lstrip("./")
    matching = [c for c in commands if isinstance(c.get("filepath"), str) and name.endswith(
        str(c["filepath"]).strip().lstrip("./"))]
    if not matching and len(commands) == 1:
        matching = commands
        conv.unmapped.append(f"the README's trt_export writes {commands[0].get('filepath')!r}, not {ts_path!r}; "
                             "its flags are used anyway (the only trt_export command)")
    if not matching:
        conv.unmapped.append(f"no trt_export command in the README writes {ts_path!r}: flags unknown")
        return {}
    flags = matching[0]
    conv.mapped.append(f"trt_export flags read from {relative(readme, conv.root)}: "
                       + " ".join(f"--{k} {v!r}" for k, v in flags.items()))
    if flags.get("net_id") not in (None, replaced):
        conv.unmapped.append(f"trt_export --net_id {flags['net_id']!r} differs from the replaced id {replaced!r}")
    if flags.get("ckpt_file"):
        conv.mapped.append(f"the zoo engine was exported from {flags['ckpt_file']}; the patch builds its engine "
                           "from the weights the bundle's loader puts into the network at run time")
    return flags


def _converter_kwargs(conv: Converter, entry: dict[str, Any], key: str, kwargs: dict[str, Any]) -> None:
    """`trt_export --converter_kwargs`: `truncate_long_and_double` becomes a build_arg; the rest is noted."""
    if "truncate_long_and_double" in kwargs:
        value = kwargs.pop("truncate_long_and_double")
        if entry["method"] in ("torch_trt", "auto"):
            entry["build_args"] = {**entry.get("build_args", {}), "truncate_double": bool(value)}
            conv.mapped.append(f"'{key}': converter_kwargs truncate_long_and_double -> build_args truncate_double")
        else:
            conv.unmapped.append(f"'{key}': converter_kwargs truncate_long_and_double has no counterpart for "
                                 f"method {entry['method']}")
    for name, value in kwargs.items():
        conv.unmapped.append(
            f"'{key}': trt_export --converter_kwargs {name}={value!r} not mapped (Torch-TensorRT TorchScript "
            "frontend option; monai_trt compiles a torch.export program; for op names use build_args "
            "torch_executed_ops with method torch_trt)"
        )
