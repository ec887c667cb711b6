"""Export-time rewrite of `aten.instance_norm` into reductions over the spatial dimensions.

PyTorch computes instance norm by viewing the `[N, C, *spatial]` input as `[1, N*C, *spatial]` and running batch
norm on it. Traced with a contiguous input, the graph keeps a bare `view`; when Inductor then picks a channels-last
layout for the convolution in front of it (its layout optimisation, on for static shapes and with `freezing`), that
view is impossible and the build fails ("Cannot view a tensor with shape [8, 48, ...] and strides ... as a tensor
with shape (1, 384, ...)", SwinUNETR on an H200, torch 2.11).

This pass writes each instance norm as the same arithmetic without a view:
`(x - mean) * rsqrt(var + eps) [* weight + bias]`, with mean and (biased) variance over the spatial dimensions, or
the running statistics where the op uses them, computed in float32 for 16-bit inputs (as PyTorch's kernels do) and
cast back. Instance norms that would update running statistics (training mode) are left unchanged.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

from monai_trt.export.graph_edit import Builder, arguments, fake_mode, finish, output_nodes, rewrite_program

__all__ = ["unview_instance_norms", "unview_instance_norms_graph"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten
_INSTANCE_NORM = aten.instance_norm.default


def unview_instance_norms(program: ExportedProgram) -> tuple[ExportedProgram, int]:
    """Rewrite every instance norm of `program` (not modified) without a view; returns the program and the count."""
    if not any(n.op == "call_function" and n.target is _INSTANCE_NORM for n in program.graph.nodes):
        return program, 0
    return rewrite_program(program, unview_instance_norms_graph, "instance-norm rewrite")


def unview_instance_norms_graph(gm: GraphModule, renamed: dict[str, str] | None = None) -> int:
    """Rewrite, in place, every instance norm of `gm` (an exported ATen graph with `meta["val"]`); returns the count.

    `renamed` receives `{old name: new name}` for each replaced node that was a graph output.
    """
    graph = gm.graph
    fake = fake_mode(graph)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _INSTANCE_NORM:
            continue
        args = arguments(node)
        if args["use_input_stats"] and args["running_mean"] is not None:
            logger.debug("instance norm %s updates running statistics: left unchanged", node.name)
            continue
        is_output = node in output_nodes(graph)
        with graph.inserting_before(node):
            new = _explicit(Builder(graph, fake, node), args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if renamed is not None and is_output:
            renamed[node.name] = new.name
        count += 1
    return finish(gm, count, "instance norm(s) without a view")


def _explicit(new: Builder, args: dict) -> Node:
    x: Node = args["input"]
    dtype = x.meta["val"].dtype
    rank = x.meta["val"].dim()
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    per_channel = [1, -1] + [1] * (rank - 2)

    def widened(node: Node) -> Node:
        return node if node.meta["val"].dtype == wide else new(aten._to_copy.default, node, dtype=wide)

    def channels(node: Node) -> Node:
        return new(aten.reshape.default, widened(node), per_channel)

    value = widened(x)
    if args["use_input_stats"]:
        var, mean = _var_mean(new, value, list(range(2, rank)))
    else:
        mean, var = channels(args["running_mean"]), channels(args["running_var"])
    scale = new(aten.rsqrt.default, new(aten.add.Tensor, var, args["eps"]))
    out = new(aten.mul.Tensor, new(aten.sub.Tensor, value, mean), scale)
    if args["weight"] is not None:
        out = new(aten.mul.Tensor, out, channels(args["weight"]))
    if args["bias"] is not None:
        out = new(aten.add.Tensor, out, channels(args["bias"]))
    return out if wide == dtype else new(aten._to_copy.default, out, dtype=dtype)


def _var_mean(new: Builder, value: Node, dims: list[int]) -> tuple[Node, Node]:
    both = new(aten.var_mean.correction, value, dims, correction=0, keepdim=True)
    return new(operator.getitem, both, 0), new(operator.getitem, both, 1)

