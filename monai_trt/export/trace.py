"""A second export route for networks `torch.export` cannot capture: trace → ONNX, only when tracing is faithful.

`torch.export` refuses Python control flow on tensor values (MONAI's DiNTS branches on `self.node_a[0][d]`, a
buffer holding the searched architecture). Tracing (the TorchScript ONNX exporter) records the one path the example
inputs take, which is exactly right when every such decision depends only on the module's own state, and silently
wrong when one depends on the inputs. :func:`input_dependent_decision` tells the two apart by running the forward
once with every input marked: values computed from marked tensors are marked too, and any Python decision on a
marked value (`bool()`, `.item()`, `int()`, `.tolist()`, ...) is reported with the line of code that made it.
"""

from __future__ import annotations

import logging
import os
import traceback
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

from monai_trt.errors import ExportError
from monai_trt.export.job import BuildJob

__all__ = ["input_dependent_decision", "export_onnx_traced"]

logger = logging.getLogger(__name__)

# Functions that turn a tensor's values into Python values the forward can branch on.
_DECISIONS = frozenset({
    torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
    torch.Tensor.__index__, torch.Tensor.numpy, torch.equal, torch.is_nonzero,
})
_OWN_FILES = (os.sep + "torch" + os.sep, __file__)


class _Marking(TorchFunctionMode):
    """Marks every tensor computed from a marked tensor; records the first Python decision on a marked value."""

    def __init__(self, inputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}  # by id, checked against the referent (tensors compare by value)
        self.decision: str | None = None
        for tensor in inputs:
            self._mark(tensor)

    def _mark(self, tensor: torch.Tensor) -> None:
        self._marked[id(tensor)] = weakref.ref(tensor)

    def _is_marked(self, value: Any) -> bool:
        ref = self._marked.get(id(value)) if isinstance(value, torch.Tensor) else None
        return ref is not None and ref() is value

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        touched = any(self._is_marked(a) for a in pytree.tree_leaves((args, kwargs)))
        if touched and func in _DECISIONS and self.decision is None:
            self.decision = f"{getattr(func, '__name__', func)}() at {_user_frame()}"
        result = func(*args, **kwargs)
        if touched:
            for leaf in pytree.tree_leaves(result):
                if isinstance(leaf, torch.Tensor):
                    self._mark(leaf)
        return result


def _user_frame() -> str:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not any(part in frame.filename for part in _OWN_FILES):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "<unknown>"


def input_dependent_decision(module: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> str | None:
    """Where `module(*inputs)` makes a Python decision on a value computed from its inputs, or None if it never does.

    Shapes are not values: `x.shape[0]` is not a decision on the input's data.
    """
    copies = [t.detach().clone() for t in inputs]
    marking = _Marking(copies)
    with torch.no_grad(), marking:
        module(*copies)
    return marking.decision


def export_onnx_traced(job: BuildJob, path: str, opset_version: int) -> None:
    """Trace the job's adapter to ONNX (TorchScript exporter), after checking that tracing is faithful.

    Raises:
        ExportError: the forward decides on input values (tracing would bake one path in), or the export failed.
    """
    decision = input_dependent_decision(job.module, job.example_inputs)
    if decision is not None:
        raise ExportError(f"the forward's control flow depends on its inputs ({decision}); a traced graph would "
                          "answer for one path only, so no engine is exported")
    _check_dynamic_dims(job)
    dynamic_axes: dict[str, dict[int, str]] = {}
    for name, ranges in zip(job.input_names, job.ranges):
        axes = {d: f"{name}_dim{d}" for d, (lo, hi) in enumerate(ranges) if lo != hi}
        if axes:
            dynamic_axes[name] = axes
    if any(0 in axes for axes in dynamic_axes.values()):
        dynamic_axes.update({name: {0: "batch"} for name in job.output_names})
    try:
        with torch.no_grad():
            torch.onnx.export(
                job.module, tuple(job.example_inputs), path, dynamo=False, opset_version=opset_version,
                input_names=list(job.input_names), output_names=list(job.output_names),
                dynamic_axes=dynamic_axes or None,
            )
    except Exception as err:
        raise ExportError(f"tracing to ONNX failed: {type(err).__name__}: {err}") from err
    logger.info("%s: exported by tracing (torch.export could not capture it; its control flow reads no input "
                "values)", job.label)


def _check_dynamic_dims(job: BuildJob) -> None:
    """A trace records Python arithmetic on sizes as constants: re-trace at the smallest size of every dynamic dim and
    require the same graph (`torch.jit.trace`'s own check), so an engine never serves sizes its trace baked out.

    Raises:
        ExportError: the traced graph depends on a dynamic dimension's size.
    """
    small = []
    for tensor, ranges in zip(job.example_inputs, job.ranges):
        for dim, (lo, hi) in enumerate(ranges):
            if lo != hi and tensor.shape[dim] != lo:
                tensor = tensor.narrow(dim, 0, lo) if lo <= tensor.shape[dim] else tensor
        small.append(tensor.contiguous())
    if all(a.shape == b.shape for a, b in zip(small, job.example_inputs)):
        return
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(job.module, tuple(job.example_inputs), check_inputs=[tuple(small)], check_trace=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise ExportError(f"the traced graph depends on the size of a dynamic dimension ({type(err).__name__}: "
                          f"{first}); no engine is exported for the range") from err

