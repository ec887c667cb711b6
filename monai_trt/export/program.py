"""torch.export / ONNX export of a build job's graph, shared by every backend that needs one."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from monai_trt.errors import ExportError
from monai_trt.export.attention import fuse_attention
from monai_trt.export.job import BuildJob
from monai_trt.export.norms import unview_instance_norms
from monai_trt.export.quiet import summarize_error
from monai_trt.export.trace import export_onnx_traced

__all__ = ["export_program", "export_onnx", "trace_examples", "dynamic_shapes", "tf32_enabled", "DEFAULT_EXPORT_ARGS"]

logger = logging.getLogger(__name__)

DEFAULT_EXPORT_ARGS: Mapping[str, Any] = {
    "opset_version": 18, "strict": False, "fuse_attention": True, "unview_instance_norms": True
}
# export_args consumed here rather than passed to torch.onnx.export
_OWN_ARGS = ("strict", "fuse_attention", "unview_instance_norms")


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
    """torch.export the job's adapter with its dynamic dimensions, then the export-time rewrites (each on by
    default, results identical up to rounding, validated like any engine):

    - export_args `fuse_attention`: `softmax(q·kᵀ·scale + bias) · v` chains become `scaled_dot_product_attention`
      (:mod:`.attention`);
    - `unview_instance_norms`: instance norms become reductions without a view, so Inductor may give the
      convolutions around them a channels-last layout (:mod:`.norms`).
    """
    strict = bool(job.export_args.get("strict", False))
    try:
        with torch.no_grad(), tf32_enabled(job.precision == "tf32"):
            program = torch.export.export(
                job.module, trace_examples(job), dynamic_shapes=dynamic_shapes(job), strict=strict
            )
    except Exception as err:
        raise ExportError(f"torch.export failed: {type(err).__name__}: {summarize_error(err)}") from err
    if job.export_args.get("fuse_attention", True):
        program, _ = fuse_attention(program)
    if job.export_args.get("unview_instance_norms", True):
        program, _ = unview_instance_norms(program)
    return program


def export_onnx(job: BuildJob, path: str) -> list[str]:
    """Export the job's adapter to ONNX at `path` (weights may go to a `.data` file beside it).

    The graph comes from torch.export (`dynamo=True`); when torch.export cannot capture it (e.g. Python control flow
    on a buffer, as in DiNTS), from tracing, but only when the forward's decisions read no input values
    (:mod:`.trace`).

    Returns:
        The file names written into the directory of `path`.

    Raises:
        ExportError: neither route gives a faithful graph.
    """
    args = {k: v for k, v in job.export_args.items() if k not in _OWN_ARGS}
    directory = os.path.dirname(path)
    before = set(os.listdir(directory))
    try:
        with torch.no_grad():
            torch.onnx.export(
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
    except Exception as err:
        cause = f"{type(err).__name__}: {summarize_error(err, limit=300)}"
        logger.info("%s: torch.export could not capture the graph (%s); trying a traced export", job.label, cause)
        for name in set(os.listdir(directory)) - before:
            os.unlink(os.path.join(directory, name))
        try:
            export_onnx_traced(job, path, int(args.get("opset_version", DEFAULT_EXPORT_ARGS["opset_version"])))
        except ExportError as traced:
            raise ExportError(f"torch.export failed ({cause}); {traced}") from err
    if not os.path.exists(path):  # pragma: no cover - exporter contract
        raise ExportError("torch.onnx.export produced no file")
    return sorted(set(os.listdir(directory)) - before)
