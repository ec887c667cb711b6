"""Map a whole zoo file: each key that makes an engine through its style, every other key with a note on why it is
not carried, then the patch: `+imports`, the `trt` switch, one `trt_patch` section per network, `+initialize`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from monai_trt.bundle.zoo.configs import ConversionError, lookup, norm
from monai_trt.bundle.zoo.entries import Converter
from monai_trt.bundle.zoo.expressions import refs_in
from monai_trt.bundle.zoo.torch_tensorrt import map_torch_tensorrt
from monai_trt.bundle.zoo.trt_compile import map_trt_compile

SWITCH_ID = "trt"
TRT_IMPORT_MARKERS = ("torch_tensorrt", "trt_compile", "tensorrt", "monai_trt")


@dataclass
class Assembled:
    """The patch of one conversion.

    Attributes:
        patch: the patch dict.
        styles: the zoo styles found, in the order of the zoo file.
        sections: patched network id -> the id of its `trt_patch` section.
    """

    patch: dict[str, Any]
    styles: tuple[str, ...]
    sections: dict[str, str]


def assemble(conv: Converter) -> Assembled:
    """Map every key of `conv`'s zoo file and build the patch.

    Raises:
        ConversionError: the zoo file is already a patch, makes no engine, or a key cannot be mapped; or the patch
            would replace an id of the inference config.
    """
    if any("monai_trt.apply(" in json.dumps(v) for v in conv.trt.values()):
        raise ConversionError(f"{conv.trt_path} is already a monai_trt patch (it calls monai_trt.apply); check it "
                              "with monai_trt.bundle.zoo.check_patch instead of converting it")
    styles: list[str] = []
    for key, value in conv.trt.items():
        if isinstance(value, str) and "trt_compile(" in value:
            map_trt_compile(conv, key, value)
            styles.append("trt_compile")
        elif isinstance(value, str) and "torch.jit.load(" in value:
            map_torch_tensorrt(conv, key, value)
            styles.append("torch_tensorrt")
    if not conv.targets:
        raise ConversionError(
            f"{conv.trt_path} is not a model-zoo TensorRT config: no id is set by trt_compile(...) or "
            "torch.jit.load(...), so there is nothing to convert"
        )
    carried = _referenced_zoo_ids(conv)
    _note_other_keys(conv, carried)
    return _patch(conv, carried, tuple(dict.fromkeys(styles)))


def _referenced_zoo_ids(conv: Converter) -> list[str]:
    """Ids only the zoo file defines that the converted entries reference (e.g. a `max_prompt_size`)."""
    carried: list[str] = []
    todo = [json.dumps(list(conv.targets.values()))]
    while todo:
        for ref in refs_in(todo.pop()):
            top = ref.split("::")[0]
            if top in conv.trt and top not in conv.inference and top not in conv.consumed and top not in carried:
                carried.append(top)
                todo.append(json.dumps(conv.trt[top]))
                conv.mapped.append(f"'{top}': carried over (the converted entries reference it)")
    return carried


def _note_other_keys(conv: Converter, carried: list[str]) -> None:
    """Note, for each zoo key that is not mapped or carried, why the patch leaves it out."""
    initialize = conv.inference.get("initialize") if isinstance(conv.inference.get("initialize"), list) else []
    imports = conv.inference.get("imports") if isinstance(conv.inference.get("imports"), list) else []
    for key, value in conv.trt.items():
        plain = key.lstrip("+")
        if key in conv.consumed or plain in conv.consumed or key in carried:
            continue
        if key in conv.keep:
            conv.mapped.append(f"'{key}' kept verbatim (keep option)")
        elif plain == "imports":
            extra = [i for i in value if i not in imports and not any(m in str(i) for m in TRT_IMPORT_MARKERS)]
            conv.mapped.append(f"'{key}': replaced by +imports ['$import monai_trt'] (the bundle's imports stay)")
            if extra:
                conv.unmapped.append(f"'{key}': imports {extra} are not in the bundle's imports; not carried")
        elif plain == "initialize":
            missing = [i for i in value if i not in initialize]
            dropped = [i for i in initialize if i not in value]
            note = f"'{key}': not carried (the bundle's initialize stays and monai_trt.apply is appended to it)"
            if dropped:
                note += f"; the zoo file's override would have dropped {dropped}"
            conv.mapped.append(note)
            if missing:
                conv.unmapped.append(f"'{key}': lines {missing} are not in the bundle's initialize; not carried")
        elif norm(key).endswith("::_disabled_"):
            loader = lookup(conv.inference, norm(key)[: -len("::_disabled_")] + "::_target_")
            why = (" — it disables the bundle's CheckpointLoader, which the zoo engine did not need but the "
                   "patched network does") if isinstance(loader, str) and loader.endswith("CheckpointLoader") else ""
            conv.mapped.append(f"'{key}': {value!r} not carried{why}")
        elif norm(key).endswith("::amp"):
            conv.mapped.append(f"'{key}': {value!r} not carried: the zoo turned AMP off for its pre-built engine; "
                               "monai_trt engines run at the entry's precision and return PyTorch's dtypes, and "
                               "PyTorch fallbacks keep the bundle's AMP setting")
        else:
            conv.unmapped.append(f"'{key}': {json.dumps(value)} not carried (a setting of the zoo's TensorRT run; "
                                 f"pass keep=['{key}'] to carry it, or set it on the command line)")


def _patch(conv: Converter, carried: list[str], styles: tuple[str, ...]) -> Assembled:
    patch: dict[str, Any] = {}
    patch["+imports" if isinstance(conv.inference.get("imports"), list) else "imports"] = ["$import monai_trt"]
    patch[SWITCH_ID] = True
    applies = []
    sections: dict[str, str] = {}
    for network, entries in conv.targets.items():
        section = "trt_patch" if network == "network" else "trt_patch_" + network.replace("::", "_")
        sections[network] = section
        patch[section] = entries
        applies.append(f"$monai_trt.apply(@{network.replace('::', '#')}, @{section}, enabled=@{SWITCH_ID})")
    taken = sorted(k for k in patch if not k.startswith("+") and k in conv.inference and k != "imports")
    if taken:
        raise ConversionError(f"{conv.inference_path.name} already defines {taken}, which the patch would replace; "
                              "rename them in the bundle or convert by hand")
    for key in carried:
        patch[key] = conv.trt[key]
    for key in conv.keep:
        if key not in conv.trt:
            raise ConversionError(f"keep: '{key}' is not a key of {conv.trt_path.name}")
        patch[key] = conv.trt[key]
    patch["+initialize" if isinstance(conv.inference.get("initialize"), list) else "initialize"] = applies
    return Assembled(patch, styles, sections)
