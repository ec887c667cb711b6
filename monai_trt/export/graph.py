"""The graph an engine is built from: the flat-tensor adapter around a module's original forward, in its precision.

The exported graph always takes the flat tensor inputs of one captured call and returns a flat tuple of tensors;
precision lives in the graph (a cast copy of the module), never in the user's module.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["FlatForward", "precision_module", "plain_copy"]

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FlatForward(nn.Module):
    """Adapter with `forward(*tensors) -> tuple[Tensor, ...]` around the original forward of `module`.

    Args:
        module: the module whose parameters the graph uses (registered as a child so they stay parameters).
        forward: the original (unwrapped) forward bound to `module`.
        rebuild: flat tensors → the forward's (args, kwargs), replaying the call's non-tensor arguments as constants
            (a captured call's `rebuild`); None for an adapter
            that only names the weights.
    """

    def __init__(
        self, module: nn.Module, forward: Callable[..., Any],
        rebuild: Callable[[Sequence[torch.Tensor]], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self._forward = forward
        self._rebuild = rebuild

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._rebuild is None:
            raise TypeError("this FlatForward only names weights; it was built without a call to replay")
        args, kwargs = self._rebuild(tensors)
        return tuple(pytree.tree_leaves(self._forward(*args, **kwargs)))


def _fp32_norm_forward(norm: nn.Module) -> Callable[..., torch.Tensor]:
    plain = type(norm).forward

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return plain(self, x.float()).to(x.dtype)

    return types.MethodType(forward, norm)


def precision_module(module: nn.Module, forward: Callable[..., Any], precision: str) -> tuple[nn.Module, Callable]:
    """The module and forward to export for `precision`.

    fp32/tf32 use the module as is. fp16/bf16 use a detached copy cast to that dtype, with normalisation layers kept
    in fp32 behind casts (numerically safe), so the user's module and its state_dict keys are never touched.
    """
    dtype = _HALF.get(precision)
    if dtype is None:
        return module, forward
    clone = plain_copy(module)
    clone.to(dtype)
    for sub in clone.modules():
        if isinstance(sub, _NORMS):
            sub.float()
            sub.forward = _fp32_norm_forward(sub)
    return clone, clone.forward  # a forward overridden on the instance is kept (bound to the copy)


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with monai_trt's instance-level forward redirections removed (the forward beneath each kept)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        wrapper = sub.__dict__.get("forward")
        if getattr(wrapper, "is_monai_trt_wrapper", False):
            beneath = wrapper.unwrap()
            if beneath is None:
                del sub.__dict__["forward"]
            else:
                sub.__dict__["forward"] = beneath
    return clone.eval()
