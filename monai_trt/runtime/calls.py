"""Capture a forward call as flat engine inputs, and put engine outputs back into the caller's structure.

Only the arguments the caller actually passed become engine inputs (forward defaults stay defaults); tensors
become inputs, other leaves (None, numbers, strings) become constants that select the engine.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = [
    "CallLayout", "CapturedCall", "UnsupportedCall", "capture_call", "engine_float_dtype", "dtype_name",
    "forward_signature", "flatten_outputs",
]

_CONSTANT_TYPES = (type(None), bool, int, float, str)


class UnsupportedCall(TypeError):
    """The call cannot be served by an engine (e.g. a non-tensor, non-constant argument); PyTorch runs it."""


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

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(t.shape) for t in self.tensors)

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
            tensor nor a JSON-like constant, or tensors live on different devices.
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
    floats = float_dtype(torch.device(device))
    leaves, tensors, slots, names, constants = [], [], [], [], []
    for slot, (path, leaf) in enumerate(flat):
        leaves.append(leaf)
        if isinstance(leaf, torch.Tensor):
            if leaf.is_complex() or leaf.is_sparse or leaf.is_quantized:
                raise UnsupportedCall(
                    f"input {_leaf_name(path)} has unsupported tensor type {leaf.dtype}/{leaf.layout}")
            tensor = leaf.to(floats) if leaf.is_floating_point() else leaf
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
    return CapturedCall(layout, tensors, signature, leaves, slots, spec)


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
