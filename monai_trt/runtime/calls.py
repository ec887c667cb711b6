"""Capture a forward call as flat engine inputs, and put engine outputs back into the caller's structure.

Only the arguments the caller actually passed become engine inputs (forward defaults stay defaults); tensors
become inputs, other leaves (None, numbers, strings) become constants that select the engine. MONAI `MetaTensor`
inputs reach the engine as plain tensors; :class:`OutputTypes` gives the engine's outputs back the type and
metadata PyTorch's outputs carry (learned from one PyTorch call, applied from each call's own inputs).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "CallLayout", "CapturedCall", "UnsupportedCall", "capture_call", "engine_float_dtype", "dtype_name",
    "forward_signature", "flatten_outputs", "OutputTypes", "learn_output_types", "ENGINE_DEVICE_TYPES",
]

_CONSTANT_TYPES = (type(None), bool, int, float, str)
# Device types an engine can run on; inputs elsewhere (e.g. `meta`, for shape inference) run PyTorch, silently.
ENGINE_DEVICE_TYPES = ("cpu", "cuda")
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


class UnsupportedCall(TypeError):
    """The call cannot be served by an engine (e.g. a non-tensor, non-constant argument); PyTorch runs it.

    Attributes:
        quiet: an expected case that is not worth a warning (e.g. `meta`-device inputs); logged at DEBUG.
    """

    def __init__(self, message: str, quiet: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet


def _meta_tensor_class() -> type | None:
    """MONAI's MetaTensor class if MONAI's data package is loaded (no MetaTensor can exist otherwise)."""
    module = sys.modules.get("monai.data.meta_tensor")
    return getattr(module, "MetaTensor", None)


def _track_meta() -> bool:
    module = sys.modules.get("monai.data.meta_obj")
    return bool(module.get_track_meta()) if module is not None else True


def _tensor_kind(tensor: torch.Tensor) -> str:
    """`plain`, `meta` or `meta-batch` (a MONAI MetaTensor, batched or not); UnsupportedCall for other subclasses."""
    if type(tensor) in _PLAIN_TENSOR_TYPES:
        return "plain"
    if type(tensor) is _meta_tensor_class():
        return "meta-batch" if tensor.is_batch else "meta"
    raise UnsupportedCall(f"input of tensor type {type(tensor).__module__}.{type(tensor).__qualname__} (only "
                          "torch.Tensor and MONAI MetaTensor inputs are served by engines)")


def engine_float_dtype(precision: str) -> torch.dtype:
    """Dtype floating-point inputs are given to an engine of `precision`."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class CallLayout:
    """Everything about a call except tensor shapes: calls with equal layouts can share engines."""

    in_tree: str
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    ndims: tuple[int, ...]
    constants: tuple[Any, ...]
    device: str

    def to_json(self) -> dict[str, Any]:
        return {
            "in_tree": self.in_tree,
            "names": list(self.names),
            "dtypes": list(self.dtypes),
            "ndims": list(self.ndims),
            "constants": list(self.constants),
        }


@dataclass
class CapturedCall:
    """A call split into engine-ready tensors, its layout, and how to rebuild (args, kwargs)."""

    layout: CallLayout
    tensors: list[torch.Tensor]
    signature: inspect.Signature
    leaves: list[Any]
    tensor_slots: list[int]
    spec: pytree.TreeSpec
    kinds: tuple[str, ...] = ()

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.tensors)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The caller's own tensor inputs (MetaTensors included), in engine input order."""
        return [self.leaves[slot] for slot in self.tensor_slots]

    @property
    def output_key(self) -> tuple[Any, ...]:
        """What decides the type of PyTorch's outputs besides the layout: input tensor kinds, MONAI's track_meta."""
        return self.layout, self.kinds, _track_meta()

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) for the original forward, with `tensors` in place of the captured ones."""
        leaves = list(self.leaves)
        for slot, tensor in zip(self.tensor_slots, tensors):
            leaves[slot] = tensor
        arguments = pytree.tree_unflatten(leaves, self.spec)
        bound = inspect.BoundArguments(self.signature, arguments)
        return bound.args, bound.kwargs


def _leaf_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    name = re.sub(r"[^0-9A-Za-z_]", "_", "_".join(parts)) or "input"
    return name if not name[0].isdigit() else f"input_{name}"


def capture_call(
    signature: inspect.Signature,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    float_dtype: Callable[[torch.device], torch.dtype],
) -> CapturedCall:
    """Split a forward call into engine inputs.

    Floating-point tensors are cast to `float_dtype(device)` (the engine's input dtype on the inputs' device) and
    made contiguous; integer and bool tensors keep their dtype (another integer dtype selects another engine).

    Raises:
        UnsupportedCall: the arguments do not bind to the forward signature, or hold a leaf that is neither a
            tensor nor a JSON-like constant, or a tensor subclass other than MONAI's MetaTensor, or tensors live on
            different devices or on a device no engine runs on (`quiet` for the latter: e.g. `meta` tensors).
    """
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise UnsupportedCall(f"arguments do not match forward{signature}: {err}") from err
    flat, spec = pytree.tree_flatten_with_path(dict(bound.arguments))
    devices = {str(leaf.device) for _, leaf in flat if isinstance(leaf, torch.Tensor)}
    if len(devices) > 1:
        raise UnsupportedCall(f"inputs are on several devices: {sorted(devices)}")
    device = devices.pop() if devices else "cpu"
    if torch.device(device).type not in ENGINE_DEVICE_TYPES:
        raise UnsupportedCall(f"inputs on device '{device}'", quiet=True)
    floats = float_dtype(torch.device(device))
    leaves, tensors, slots, names, constants, kinds = [], [], [], [], [], []
    for slot, (path, leaf) in enumerate(flat):
        leaves.append(leaf)
        if isinstance(leaf, torch.Tensor):
            if leaf.is_complex() or leaf.is_sparse or leaf.is_quantized:
                raise UnsupportedCall(
                    f"input {_leaf_name(path)} has unsupported tensor type {leaf.dtype}/{leaf.layout}")
            kinds.append(_tensor_kind(leaf))
            tensor = leaf if kinds[-1] == "plain" else leaf.as_subclass(torch.Tensor)
            tensor = tensor.to(floats) if tensor.is_floating_point() else tensor
            tensors.append(tensor.contiguous())
            slots.append(slot)
            names.append(_leaf_name(path))
        elif isinstance(leaf, _CONSTANT_TYPES):
            constants.append(leaf)
        else:
            raise UnsupportedCall(
                f"argument {_leaf_name(path)} of type {type(leaf).__name__} is not a tensor or constant")
    names = _dedupe(names)
    layout = CallLayout(
        in_tree=str(spec),
        names=tuple(names),
        dtypes=tuple(dtype_name(t.dtype) for t in tensors),
        ndims=tuple(t.dim() for t in tensors),
        constants=tuple(constants),
        device=device,
    )
    return CapturedCall(layout, tensors, signature, leaves, slots, spec, tuple(kinds))


def _dedupe(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name}_{count}")
    return out


def forward_signature(forward: Callable[..., Any]) -> inspect.Signature:
    """Signature used to bind calls (falls back to *args, **kwargs when it cannot be read)."""
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        params = [
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
        return inspect.Signature(params)


def flatten_outputs(outputs: Any) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    """Flatten a forward's outputs; every leaf must be a tensor."""
    leaves, spec = pytree.tree_flatten(outputs)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise UnsupportedCall(f"forward returned a {type(leaf).__name__} leaf; engines return only tensors")
    return leaves, spec


@dataclass(frozen=True)
class OutputTypes:
    """The type PyTorch gives each output leaf: a plain tensor, or a MONAI MetaTensor carrying an input's metadata.

    Attributes:
        sources: per output leaf, None (plain tensor) or the index (in :attr:`CapturedCall.inputs`) of the MetaTensor
            input whose metadata the output carries, copied as MONAI's own ops copy it (shared when batched).
    """

    sources: tuple[int | None, ...]

    def apply(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`outputs` (plain engine tensors) dressed as PyTorch's would be, with metadata from this call's `inputs`."""
        return [out if k is None else _with_meta_of(out, inputs[k]) for out, k in zip(outputs, self.sources)]


def _with_meta_of(tensor: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`tensor` as a MetaTensor with the metadata of MetaTensor `source` (what MONAI's `update_meta` does)."""
    dressed = tensor.as_subclass(type(source))
    dressed.copy_meta_from(source, copy_attr=not source.is_batch)
    return dressed


def learn_output_types(reference: Sequence[torch.Tensor], call: CapturedCall) -> OutputTypes | str:
    """How PyTorch's output leaves for `call` relate to its inputs, checked by reproducing them exactly.

    Each MetaTensor output must carry exactly the metadata (meta dict, applied operations, batch flag…) of one
    MetaTensor input, as MONAI's ops propagate it; the first input that reproduces it is chosen.

    Returns:
        The rule, or why the outputs cannot be reproduced from the inputs (those calls must run in PyTorch).
    """
    meta_class = _meta_tensor_class()
    inputs = call.inputs
    sources: list[int | None] = []
    for i, leaf in enumerate(reference):
        if type(leaf) in _PLAIN_TENSOR_TYPES:
            sources.append(None)
            continue
        if meta_class is None or type(leaf) is not meta_class:
            return f"output {i} is a {type(leaf).__module__}.{type(leaf).__qualname__}"
        plain = leaf.as_subclass(torch.Tensor)
        match = next((k for k, inp in enumerate(inputs) if type(inp) is meta_class
                      and _same(_with_meta_of(plain, inp).__dict__, leaf.__dict__)), None)
        if match is None:
            return f"output {i} is a MetaTensor whose metadata is not that of any MetaTensor input"
        sources.append(match)
    return OutputTypes(tuple(sources))


def _same(a: Any, b: Any) -> bool:
    """Deep equality of metadata values (tensors, arrays, dicts, lists, scalars); False when undecidable."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a.detach().cpu().as_subclass(torch.Tensor),
                                                            b.detach().cpu().as_subclass(torch.Tensor))))
    if isinstance(a, dict) or isinstance(b, dict):
        return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        equal = a == b
        return bool(equal.all()) if hasattr(equal, "all") else bool(equal)
    except Exception:  # incomparable values: cannot prove they are the same
        return False
