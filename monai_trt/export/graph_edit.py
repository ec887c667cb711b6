"""Editing an exported ATen graph: the plumbing shared by the export-time rewrites (:mod:`.attention`,
:mod:`.norms`).

A rewrite is a function `edit(gm, renamed) -> count` that changes a graph module in place, giving every node it
creates `meta["val"]` (see :class:`Builder`) and recording in `renamed` the graph outputs it replaced.
:func:`rewrite_program` runs it on a copy of a program and never fails a build: a rewrite that raises leaves the
program as exported, with one warning.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, OutputSpec, TensorArgument
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

__all__ = ["ASSERTS", "Builder", "arguments", "fake_mode", "finish", "output_nodes", "rewrite_program"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

ASSERTS = {getattr(aten, name).default for name in ("_assert_tensor_metadata",) if hasattr(aten, name)}
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node")

Edit = Callable[[GraphModule, dict[str, str]], int]


def rewrite_program(program: ExportedProgram, edit: Edit, what: str) -> tuple[ExportedProgram, int]:
    """Run `edit` on a copy of `program`'s graph.

    Returns:
        The rewritten program and the count `edit` returned; `program` itself (unchanged) when that count is 0 or,
        with a warning naming `what`, when `edit` raised.
    """
    try:
        gm = _copy_module(program.graph_module)
        renamed: dict[str, str] = {}
        count = edit(gm, renamed)
        if not count:
            return program, 0
        return _with_graph(program, gm, renamed), count
    except Exception as error:  # an optional optimisation must not fail a build: keep the program as exported
        debug = logger.isEnabledFor(logging.DEBUG)
        logger.warning("%s skipped (%s: %s)", what, type(error).__name__, error, exc_info=debug)
        return program, 0


def finish(gm: GraphModule, count: int, what: str) -> int:
    """After an edit that rewrote `count` places: check and recompile the graph, say what changed; returns `count`."""
    if count:
        gm.graph.lint()
        gm.recompile()
        logger.info("rewrote %d %s", count, what)
    return count


class Builder:
    """Creates call_function nodes with `meta["val"]` computed under the graph's fake mode; the source metadata
    (module stack, stack trace) is copied from `anchor`, the node being replaced."""

    def __init__(self, graph: Graph, fake: Any, anchor: Node) -> None:
        self.graph = graph
        self.fake_mode = fake
        self.meta = {k: anchor.meta[k] for k in _META_KEYS if k in anchor.meta}

    def __call__(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Node:
        return self._annotate(self.graph.call_function(target, args, kwargs))

    def copy(self, node: Node, remap: Callable[[Node], Node]) -> Node:
        return self._annotate(self.graph.node_copy(node, remap))

    def _annotate(self, node: Node) -> Node:
        node.meta.update(self.meta)
        args = map_arg(node.args, lambda n: n.meta["val"])
        kwargs = map_arg(node.kwargs, lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = node.target(*args, **kwargs)
        return node


def arguments(node: Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    values: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            values[arg.name] = arg.default_value
    return values


def fake_mode(graph: Graph) -> Any:
    """The fake mode of the graph's placeholders (a fresh one when they carry none)."""
    mode = detect_fake_mode([n.meta["val"] for n in graph.nodes if n.op == "placeholder" and "val" in n.meta])
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def output_nodes(graph: Graph) -> set[Node]:
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    nodes: set[Node] = set()
    map_arg(output.args, lambda n: nodes.add(n) or n)
    return nodes


def _copy_module(gm: GraphModule) -> GraphModule:
    """A copy of `gm` whose graph can be edited without changing `gm` (attributes and node metadata are shared)."""
    with warnings.catch_warnings():  # torch's own deepcopy of the pytree codegen warns about a deprecated spec API
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = GraphModule(gm, graph, gm.__class__.__name__)
    new.meta.update(gm.meta)
    return new


def _with_graph(program: ExportedProgram, gm: GraphModule, renamed: dict[str, str]) -> ExportedProgram:
    """`program` with graph module `gm`, its output specs following `renamed`."""
    signature = program.graph_signature
    outputs = []
    for spec in signature.output_specs:
        arg = spec.arg
        if isinstance(arg, TensorArgument) and arg.name in renamed:
            arg = TensorArgument(name=renamed[arg.name])
        outputs.append(OutputSpec(kind=spec.kind, arg=arg, target=spec.target))
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=ExportGraphSignature(input_specs=list(signature.input_specs), output_specs=outputs),
        state_dict=program.state_dict,
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        example_inputs=program.example_inputs,
        constants=program.constants,
        verifiers=program.verifiers,
    )
