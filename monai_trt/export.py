"""torch → torch.export / ONNX, shared by every backend that needs a graph.

The exported graph always takes the flat tensor inputs of one captured call and returns a flat tuple of tensors;
precision lives in the graph (a cast copy of the module), never in the user's module.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from monai_trt.backends.base import BuildJob
from monai_trt.calls import CapturedCall, flatten_outputs

__all__ = ["FlatForward", "precision_module", "export_program", "export_onnx", "trace_examples", "DEFAULT_EXPORT_ARGS"]

logger = logging.getLogger(__name__)

DEFAULT_EXPORT_ARGS: Mapping[str, Any] = {"opset_version": 18, "strict": False}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm)
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class FlatForward(nn.Module):
    """Adapter with `forward(*tensors) -> tuple[Tensor, ...]` around the original forward of `module`.

    Args:
        module: the module whose parameters the graph uses (registered as a child so they stay parameters).
        forward: the original (unwrapped) forward bound to `module`.
        call: the captured call whose non-tensor arguments are replayed as constants.
    """

    def __init__(self, module: nn.Module, forward: Callable[..., Any], call: CapturedCall) -> None:
        super().__init__()
        self.module = module
        self._forward = forward
        self._call = call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self._call.rebuild(tensors)
        leaves, _ = flatten_outputs(self._forward(*args, **kwargs))
        return tuple(leaves)


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
    clone = _plain_copy(module)
    clone.to(dtype)
    for sub in clone.modules():
        if isinstance(sub, _NORMS):
            sub.float()
            sub.forward = _fp32_norm_forward(sub)
    return clone, types.MethodType(type(clone).forward, clone)


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with monai_trt's instance-level forward redirections removed."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        if getattr(sub.__dict__.get("forward"), "is_monai_trt_wrapper", False):
            del sub.__dict__["forward"]
    return clone.eval()


def trace_examples(job: BuildJob) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing: a dynamic dimension of size 1 is grown to 2, so the exporter keeps it dynamic."""
    examples = []
    for tensor, ranges in zip(job.example_inputs, job.ranges):
        for dim, (lo, hi) in enumerate(ranges):
            if lo != hi and tensor.shape[dim] == 1 and hi >= 2:
                tensor = torch.cat([tensor, tensor], dim=dim)
        examples.append(tensor)
    return tuple(examples)


def dynamic_shapes(job: BuildJob) -> dict[str, tuple[dict[int, Any], ...]]:
    """torch.export dynamic_shapes for the adapter's `*tensors` argument."""
    spec = []
    for ranges in job.ranges:
        # torch.export treats sizes 0/1 as special and traces dynamic dims as >= 2, so a range of [1, 2] would
        # collapse to the constant 2; the exported range is widened (never narrowed): profiles still bound calls.
        dims = {d: torch.export.Dim.DYNAMIC(min=lo, max=max(hi, 3)) for d, (lo, hi) in enumerate(ranges) if lo != hi}
        spec.append(dims)
    return {"tensors": tuple(spec)}


@contextlib.contextmanager
def tf32_enabled(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on or off, restored on exit."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def export_program(job: BuildJob) -> torch.export.ExportedProgram:
    """torch.export the job's adapter with its dynamic dimensions."""
    strict = bool(job.export_args.get("strict", False))
    with torch.no_grad(), tf32_enabled(job.precision == "tf32"):
        return torch.export.export(
            job.module, trace_examples(job), dynamic_shapes=dynamic_shapes(job), strict=strict
        )


def export_onnx(job: BuildJob, path: str) -> list[str]:
    """Export the job's adapter to ONNX at `path` (weights may go to a `.data` file beside it).

    Returns:
        The file names written into the directory of `path`.
    """
    args = {k: v for k, v in job.export_args.items() if k != "strict"}
    directory = os.path.dirname(path)
    before = set(os.listdir(directory))
    with torch.no_grad():
        program = torch.onnx.export(
            job.module,
            trace_examples(job),
            path,
            dynamo=True,
            dynamic_shapes=dynamic_shapes(job),
            input_names=list(job.input_names),
            output_names=list(job.output_names) or None,
            verbose=False,
            **args,
        )
    if program is None and not os.path.exists(path):  # pragma: no cover - exporter contract
        raise RuntimeError("torch.onnx.export produced no file")
    return sorted(set(os.listdir(directory)) - before)
