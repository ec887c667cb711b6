"""Export-time rewrite of explicit attention into `aten.scaled_dot_product_attention` (SDPA).

Networks that spell attention out, `softmax(q @ k.transpose(-2, -1) * scale + bias [+ mask]) @ v`, reach the
compiler as a matmul, a chain of elementwise ops, a softmax and a second matmul. Inductor's own attention patterns
miss most of them (bias and mask chains through reshapes, as in SwinUNETR's shifted windows), so this pass finds
them in an exported ATen graph and replaces each with one SDPA call, for which the backend has fused kernels.

The match is structural, never keyed on module names. From every softmax over the last dimension it walks:

* forward, through eval-mode dropout, dtype casts, copies and reshapes (each the single user of the previous op),
  to a second matmul (`matmul`, `bmm` or an `einsum` of that form) whose left operand it is: `P @ v`;
* backward, through a chain of single-user ops, to a first matmul `q @ kᵀ` (`kᵀ` a transpose or permute of the
  last two dimensions of k, any other tensor, or an `einsum` spelling of either). The chain may hold
  multiplications and divisions by numbers or by tensors constant over the last two dimensions (the scale, a
  per-head temperature), additions of tensors that broadcast to the chain (bias, mask), row-preserving reshapes
  (`view(b // nw, nw, h, n, n)`), copies and casts between the attention dtype and a wider float.

Such a chain is affine in the scores `S`: `chain(S) = a * S + chain(0)`, with `a` the product of the factors. So
SDPA gets `scale=a` (a tensor factor is applied to q instead) and `attn_mask=chain(0)` in the scores' shape: the
bias tensors summed in their own broadcast shape, or, when the chain reshapes, the chain's adds and reshapes
replayed on zeros of the scores' shape. A multiplication or division of q by a number just before the first
matmul is folded into `scale` as well. Anything else (softmax over another dimension, training-mode dropout, a
softmax or intermediate with a second user, boolean `masked_fill`, narrowing casts, an op broadcasting the scores
themselves, q, k and v with different batch dimensions, ...) is left unchanged.

Numerics: the result equals the original up to floating-point rounding, with one exception: a row whose every
score is `-inf` gives NaN explicitly, and may give zeros from SDPA (PyTorch's SDPA uses a "safe" softmax).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.fx import Graph, GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from monai_trt.export.graph_edit import ASSERTS, Builder, arguments, fake_mode, finish, output_nodes, rewrite_program

__all__ = ["fuse_attention", "fuse_attention_graph"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_EINSUM = aten.einsum.default
_ADD = {aten.add.Tensor}
_MUL = {aten.mul.Tensor, aten.mul.Scalar}
_DIV = {aten.div.Tensor, aten.div.Scalar}
_RESHAPE = {  # row-major reshapes: they keep the flat order of the elements
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.flatten.using_ints,
    aten.unflatten.int,
}
_COPY = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default}
_CAST = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other, aten._to_copy.default, aten.type_as.default
}
_TRANSPOSE = {aten.transpose.int, aten.permute.default}
_SDPA = aten.scaled_dot_product_attention.default


class _NoMatch(Exception):
    """The site does not have the expected form; the reason is logged at debug level."""


@dataclass
class _Operand:
    """An SDPA operand of shape (..., n, d): `node`, or `node` transposed in its last two dimensions."""

    node: Node
    transpose: bool = False


@dataclass
class _Step:
    """One op of the chain from the scores to the softmax: `node = op(source, other)`."""

    node: Node
    kind: str  # "add", "scale" (multiply or divide), "reshape", "same" (copy or cast)
    source: Node
    other: Any = None  # the bias node of an add; the factor (number or node) of a scale


@dataclass
class _Site:
    """One matched attention, from the first matmul `scores` to the second matmul `out`."""

    scores: Node
    query: _Operand
    key: _Operand
    value: _Operand
    chain: list[_Step]  # scores -> softmax input, in graph order
    softmax: Node
    post: list[Node]  # softmax -> second matmul, in graph order, without either
    out: Node
    dtype: torch.dtype = torch.float32
    scale: float = 1.0
    factors: list[tuple[Callable[..., Any], Node]] = field(default_factory=list)  # (mul or div, tensor) for q
    peeled: list[Node] = field(default_factory=list)  # ops on q or k absorbed into the SDPA call


def fuse_attention(program: ExportedProgram) -> tuple[ExportedProgram, int]:
    """Rewrite every explicit attention of `program` into `aten.scaled_dot_product_attention`.

    Meant for the program `torch.export.export` returns, before `run_decompositions` (the `bmm` forms of a
    decomposed graph are matched too). `program` itself is not modified.

    Args:
        program: an exported program.

    Returns:
        The rewritten program (`program` itself when nothing matched, or, with a warning, when the rewrite failed)
        and the number of attention sites rewritten.
    """
    if not any(n.op == "call_function" and n.target in _SOFTMAX for n in program.graph.nodes):
        return program, 0
    return rewrite_program(program, fuse_attention_graph, "attention rewrite")


def fuse_attention_graph(gm: GraphModule, renamed: dict[str, str] | None = None) -> int:
    """Rewrite, in place, every explicit attention of `gm`, an exported ATen graph, into SDPA.

    Args:
        gm: the graph module; its nodes need `meta["val"]` (fake tensors), as exported graphs have.
        renamed: if given, receives `{old name: new name}` for each replaced node that was a graph output, for
            a signature that names the outputs.

    Returns:
        The number of attention sites rewritten.
    """
    graph = gm.graph
    fake = fake_mode(graph)
    count = 0
    for node in list(graph.nodes):
        if node._erased or node.op != "call_function" or node.target not in _SOFTMAX:
            continue
        try:
            site = _match(node)
        except _NoMatch as reason:
            logger.debug("softmax %s left unchanged: %s", node.name, reason)
            continue
        is_output = site.out in output_nodes(graph)
        old = site.out.name
        new = _rewrite(graph, site, fake)
        if renamed is not None and is_output:
            renamed[old] = new.name
        count += 1
    return finish(gm, count, "explicit attention(s) into scaled_dot_product_attention")


# --------------------------------------------------------------------------------------------------------- matching


def _match(softmax: Node) -> _Site:
    """The attention site around `softmax`, or `_NoMatch`."""
    scores_in = softmax.args[0]
    rank = _val(scores_in).dim()
    if rank < 2 or arguments(softmax)["dim"] not in (-1, rank - 1):
        raise _NoMatch("softmax is not over the last dimension")
    post, out, value = _match_forward(softmax)
    errors: list[str] = []
    for chain, scores in _match_backward(scores_in, errors):
        try:
            query, key, peeled = _first_operands(scores)
            site = _Site(scores, query, key, value, chain, softmax, post, out, peeled=peeled)
            _check(site)
            _collect_scale(site)
        except _NoMatch as reason:
            errors.append(str(reason))
            continue
        return site
    raise _NoMatch("; ".join(dict.fromkeys(errors)) or "no first matmul")


def _match_forward(softmax: Node) -> tuple[list[Node], Node, _Operand]:
    """The pass-through ops after `softmax` and the second matmul `P @ v`, with its v."""
    post: list[Node] = []
    node = softmax
    while True:
        user = _only_user(node)
        if user.op != "call_function":
            raise _NoMatch(f"the probabilities reach {user.op} {user.name}")
        if user.target in _MATMUL:
            if user.args[0] is not node or user.args[1] is node:
                raise _NoMatch("the probabilities are not the left operand of the second matmul")
            return post, user, _Operand(user.args[1])
        if user.target is _EINSUM:
            return post, user, _einsum_value(user, node)
        if not _passes_through(user, node):
            raise _NoMatch(f"{user.target} between softmax and the second matmul")
        post.append(user)
        node = user


def _passes_through(node: Node, source: Node) -> bool:
    """Whether `node` forwards the probabilities `source` (dtype and layout are checked later)."""
    if not node.args or node.args[0] is not source or any(a is source for a in node.args[1:]):
        return False
    target = node.target
    if target is aten.dropout.default:
        args = arguments(node)
        return not args["train"] or args["p"] == 0
    if target in _COPY or target in _RESHAPE:
        return True
    if target in _CAST:
        return _is_float_cast(node)
    if target is aten.expand.default:
        return _same(_val(node).shape, _val(source).shape)
    return False


def _match_backward(node: Node, errors: list[str]) -> Iterator[tuple[list[_Step], Node]]:
    """Every way to read `node` as `chain(first matmul)`: `(steps in graph order, first matmul)`.

    Additions and multiplications with two tensor operands are tried both ways round; failures go to `errors`.
    """
    try:
        _only_user(node)
    except _NoMatch as reason:
        errors.append(str(reason))
        return
    if node.op != "call_function":
        errors.append(f"the scores come from {node.op} {node.name}")
        return
    if node.target in _MATMUL or node.target is _EINSUM:
        yield [], node
        return
    try:
        steps = _steps(node)
    except _NoMatch as reason:
        errors.append(str(reason))
        return
    for step in steps:
        for chain, scores in _match_backward(step.source, errors):
            yield [*chain, step], scores


def _steps(node: Node) -> list[_Step]:
    """The readings of `node` as one chain step (several when both operands could be the scores)."""
    target = node.target
    if target in _RESHAPE:
        return [_Step(node, "reshape", node.args[0])]
    if target in _COPY:
        return [_Step(node, "same", node.args[0])]
    if target in _CAST:
        if not _is_float_cast(node):
            raise _NoMatch("cast of the scores to a non-float or another device")
        return [_Step(node, "same", node.args[0])]
    if target in _ADD:
        if arguments(node).get("alpha", 1) != 1:
            raise _NoMatch("add with alpha")
        pairs = [(node.args[0], node.args[1]), (node.args[1], node.args[0])]
        steps = [_Step(node, "add", s, o) for s, o in pairs if _keeps_shape(node, s) and isinstance(o, Node)]
    elif target in _MUL or target in _DIV:
        pairs = [(node.args[0], node.args[1])]
        if target in _MUL:
            pairs.append((node.args[1], node.args[0]))
        steps = [_Step(node, "scale", s, o) for s, o in pairs if _keeps_shape(node, s) and _is_factor(o)]
    else:
        raise _NoMatch(f"{target} on the scores")
    steps = [s for s in steps if s.source is not s.other]
    if not steps:
        raise _NoMatch(f"{target} that is not scores + tensor or scores * factor, or that broadcasts the scores")
    return steps


def _keeps_shape(node: Node, source: Any) -> bool:
    return isinstance(source, Node) and _same(_val(source).shape, _val(node).shape)


def _is_factor(value: Any) -> bool:
    return isinstance(value, Node) or _finite_number(value)


def _check(site: _Site) -> None:
    """Shapes and dtypes that make the rewrite exact; `_NoMatch` otherwise."""
    q, k, v, s, o = (_val(n) for n in (site.query.node, site.key.node, site.value.node, site.scores, site.out))
    dtype = q.dtype
    if not dtype.is_floating_point or {k.dtype, v.dtype, s.dtype, o.dtype} != {dtype}:
        raise _NoMatch("q, k, v, scores and output do not share one floating dtype")
    if q.dim() not in (3, 4) or {k.dim(), v.dim(), s.dim()} != {q.dim()}:
        raise _NoMatch(f"q, k, v are {q.dim()}-D, {k.dim()}-D, {v.dim()}-D (3-D or 4-D supported)")
    k_shape, v_shape = _shape(k, site.key.transpose), _shape(v, site.value.transpose)
    if not all(_same(q.shape[:-2], shape[:-2]) for shape in (k_shape, v_shape, s.shape)):
        raise _NoMatch("q, k, v do not share their batch dimensions")
    if not _same(s.shape, (*q.shape[:-1], k_shape[-2])) or not _same(o.shape, (*q.shape[:-1], v_shape[-1])):
        raise _NoMatch("scores or output are not shaped as attention")
    if not _same(_val(site.softmax).shape[-1:], s.shape[-1:]):
        raise _NoMatch("the reshapes before softmax move its rows")
    probs = _val(site.post[-1] if site.post else site.softmax)
    if not _same(probs.shape, s.shape) or probs.dtype != dtype:
        raise _NoMatch("the probabilities reaching the second matmul are not shaped as the scores")
    wide = {dtype} | {t for t in (torch.float32, torch.float64) if torch.finfo(t).bits >= torch.finfo(dtype).bits}
    if any(_val(n).dtype not in wide for n in [*(st.node for st in site.chain), site.softmax, *site.post]):
        raise _NoMatch("the scores or probabilities are cast to a narrower or other dtype")
    reshaped = False
    for step in site.chain:
        reshaped = reshaped or step.kind == "reshape"
        if isinstance(step.other, Node):
            other = _val(step.other)
            # a wider bias or mask (e.g. SwinUNETR's float32 shift mask on half scores) widens the chain, as a cast
            # would; SDPA gets it in the attention dtype and adds it in its float32 accumulators
            if other.dim() > 0 and other.dtype != dtype and not (step.kind == "add" and other.dtype in wide):
                raise _NoMatch(f"{step.kind} with a tensor of dtype {other.dtype}")
            if step.kind == "scale" and (reshaped or not _per_head(other, _val(step.node))):
                raise _NoMatch("a tensor factor that is not constant over the last two dimensions of the scores")
    site.dtype = dtype


def _first_operands(scores: Node) -> tuple[_Operand, _Operand, list[Node]]:
    """`(q, k, peeled)` of the first matmul, k as (..., S, E) once its `transpose` flag is applied."""
    if scores.target is not _EINSUM:
        key, peeled = _key_from_transposed(scores.args[1])
        return _Operand(scores.args[0]), key, peeled
    (a, b, out), (q, k) = _einsum_parts(scores)
    batch, x, d = a[:-2], a[-2], a[-1]
    if b[:-2] != batch or d not in b[-2:]:
        raise _NoMatch(f"einsum {scores.args[0]} is not q @ k^T")
    y = b[-2] if b[-1] == d else b[-1]
    _distinct(batch, x, d, y)
    if out != [*batch, x, y]:
        raise _NoMatch(f"einsum {scores.args[0]} is not q @ k^T")
    if b[-1] == d:  # k given as (..., S, E)
        return _Operand(q), _Operand(k), []
    key, peeled = _key_from_transposed(k)
    return _Operand(q), key, peeled


def _key_from_transposed(kt: Any) -> tuple[_Operand, list[Node]]:
    """k as (..., S, E) from kᵀ: the input of a transpose of the last two dimensions, or kᵀ transposed back."""
    if not isinstance(kt, Node):
        raise _NoMatch("matmul of a non-tensor")
    if kt.op == "call_function" and kt.target in _TRANSPOSE:
        rank = _val(kt).dim()
        if kt.target is aten.transpose.int:
            swaps_last = sorted(d % rank for d in kt.args[1:3]) == [rank - 2, rank - 1]
        else:
            swaps_last = [d % rank for d in kt.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
        if swaps_last:
            return _Operand(kt.args[0]), [kt]
    return _Operand(kt, transpose=True), []


def _einsum_value(node: Node, probs: Node) -> _Operand:
    """v of `einsum('...xy,...yd->...xd', P, v)` (or with v given as `...dy`)."""
    (a, b, out), (p, v) = _einsum_parts(node)
    if p is not probs or v is probs:
        raise _NoMatch("einsum does not take the probabilities as its left operand")
    batch, x, y = a[:-2], a[-2], a[-1]
    if b[:-2] != batch or y not in b[-2:]:
        raise _NoMatch(f"einsum {node.args[0]} is not P @ v")
    d = b[-1] if b[-2] == y else b[-2]
    _distinct(batch, x, y, d)
    if out != [*batch, x, d]:
        raise _NoMatch(f"einsum {node.args[0]} is not P @ v")
    return _Operand(v, transpose=b[-1] == y)


def _einsum_parts(node: Node) -> tuple[tuple[list[str], list[str], list[str]], tuple[Any, Any]]:
    """The subscripts of both inputs and the output (token lists, `...` one token), and the two operands."""
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        raise _NoMatch("einsum that is not binary with an explicit output")
    inputs, output = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2:
        raise _NoMatch("einsum that is not binary")
    a, b, out = (_tokens(t) for t in (*terms, output))
    if min(len(a), len(b), len(out)) < 3:
        raise _NoMatch("einsum without batch dimensions")
    return (a, b, out), (operands[0], operands[1])


def _tokens(term: str) -> list[str]:
    ellipsis = term.startswith("...")
    letters = term[3:] if ellipsis else term
    if not letters.isalpha():
        raise _NoMatch(f"einsum term {term!r}")
    return (["..."] if ellipsis else []) + list(letters)


def _distinct(batch: Sequence[str], *letters: str) -> None:
    tokens = [*batch, *letters]
    if len(set(tokens)) != len(tokens):
        raise _NoMatch("einsum with repeated subscripts")


def _collect_scale(site: _Site) -> None:
    """Fold the chain's numeric factors and a numeric scale of q into `site.scale`; tensor factors go to q."""
    for step in site.chain:
        if step.kind != "scale":
            continue
        divide = step.node.target in _DIV
        if isinstance(step.other, Node):
            site.factors.append((aten.div.Tensor if divide else aten.mul.Tensor, step.other))
        else:
            site.scale = site.scale / step.other if divide else site.scale * step.other
    q = site.query.node
    if q.op == "call_function" and (q.target in _MUL or q.target in _DIV) and len(q.users) == 1:
        source, factor = q.args[0], q.args[1]
        if (
            isinstance(source, Node)
            and _finite_number(factor)
            and _val(source).dtype == _val(q).dtype
            and _same(_val(source).shape, _val(q).shape)
        ):
            site.scale = site.scale / factor if q.target in _DIV else site.scale * factor
            site.query = _Operand(source)
            site.peeled.append(q)
    if not math.isfinite(site.scale) or site.scale == 0:
        raise _NoMatch(f"scale {site.scale}")


# --------------------------------------------------------------------------------------------------------- rewriting


def _rewrite(graph: Graph, site: _Site, fake: Any) -> Node:
    """Replace `site` with one SDPA node (and its mask and reshapes); returns the node that now gives the output."""
    new = Builder(graph, fake, site.out)
    with graph.inserting_before(site.out):
        query, key, value = (
            new(aten.transpose.int, op.node, -2, -1) if op.transpose else op.node
            for op in (site.query, site.key, site.value)
        )
        for op, factor in site.factors:
            query = new(op, query, factor)
        mask = _aligned(new, _mask(new, site, query, value))
        flat = _val(query).dim() == 3
        if flat:  # SDPA kernels want (N, H, L, E)
            query, key, value = (new(aten.unsqueeze.default, t, 1) for t in (query, key, value))
            if mask is not None and _val(mask).dim() == 3:
                mask = new(aten.unsqueeze.default, mask, 1)
        result = new(_SDPA, query, key, value, mask, 0.0, False, scale=float(site.scale))
        if flat:
            result = new(aten.squeeze.dim, result, 1)
    site.out.replace_all_uses_with(result)
    for node in [site.out, *reversed(site.post), site.softmax, *(s.node for s in reversed(site.chain)), site.scores]:
        for user in [u for u in node.users if u.target in ASSERTS]:
            graph.erase_node(user)
        graph.erase_node(node)
    for node in site.peeled:
        if not node.users:
            graph.erase_node(node)
    return result


def _mask(new: Builder, site: _Site, query: Node, value: Node) -> Node | None:
    """`chain(0)` in a shape that broadcasts to the scores', or None when the chain adds nothing."""
    if not any(step.kind == "add" for step in site.chain):
        return None
    if not any(step.kind == "reshape" for step in site.chain):
        # the bias terms, times the factors after them, summed in their own broadcast shape
        mask: Node | None = None
        for step in site.chain:
            if step.kind == "add":
                mask = step.other if mask is None else new(aten.add.Tensor, mask, step.other)
            elif step.kind == "scale" and mask is not None:
                divide = step.node.target in _DIV
                mask = new(aten.div.Tensor if divide else aten.mul.Tensor, mask, step.other)
        return _as_dtype(new, mask, site.dtype)
    # the chain's adds, factors and reshapes replayed on zeros of the scores' shape (casts and copies skipped)
    shape = _shape_args(new, _val(site.scores), query, value)
    env: dict[Node, Node] = {site.scores: new(aten.new_zeros.default, query, shape)}
    for step in site.chain:
        if step.kind == "same":
            env[step.node] = env[step.source]
        else:
            env[step.node] = new.copy(step.node, lambda n: env.get(n, n))
    mask = env[site.chain[-1].node]
    if not _same(_val(mask).shape, _val(site.scores).shape):
        mask = new(aten.reshape.default, mask, shape)
    return _as_dtype(new, mask, site.dtype)


def _aligned(new: Builder, mask: Node | None) -> Node | None:
    """The mask as a view of a zero-padded copy whose rows start at multiples of :data:`_MASK_ALIGNMENT` elements.

    CUDA SDPA kernels need aligned mask rows. Eager PyTorch pads a misaligned mask with zeros; Inductor instead
    allocates padded strides without writing the padding, so this gives the engine eager's layout. It was added
    while chasing a static-shape SwinUNETR engine (343-key windows) that answered right on its first run and NaN on
    every later one (H200, torch 2.11); it did not fix that engine, which the two-run validation refuses.
    """
    if mask is None:
        return None
    shape = _val(mask).shape
    size = shape[-1]
    if not all(isinstance(d, int) for d in shape) or size % _MASK_ALIGNMENT == 0:
        return mask  # symbolic sizes: padding would add guards (and the dynamic-shape engines were seen right)
    padded = new(aten.constant_pad_nd.default, mask, [0, -size % _MASK_ALIGNMENT], 0.0)
    return new(aten.slice.Tensor, padded, -1, 0, size)


_MASK_ALIGNMENT = 8  # elements; what PyTorch's own preprocess_mask pads to


def _as_dtype(new: Builder, mask: Node | None, dtype: torch.dtype) -> Node | None:
    if mask is not None and _val(mask).dtype != dtype:
        mask = new(aten.to.dtype, mask, dtype)
    return mask


def _shape_args(new: Builder, scores: torch.Tensor, query: Node, value: Node) -> list[Any]:
    """The scores' shape as size arguments: ints, or `sym_size` nodes of q (batch, L) and v (S)."""
    rank = scores.dim()
    shape: list[Any] = []
    for d, size in enumerate(scores.shape):
        if isinstance(size, int):
            shape.append(size)
        elif d == rank - 1:
            shape.append(new(aten.sym_size.int, value, rank - 2))
        else:
            shape.append(new(aten.sym_size.int, query, d))
    return shape


# ----------------------------------------------------------------------------------------------------------- helpers


def _only_user(node: Node) -> Node:
    """The single user of `node` other than metadata assertions, or `_NoMatch`."""
    users = [u for u in node.users if u.target not in ASSERTS]
    if len(users) != 1:
        raise _NoMatch(f"{node.name} has {len(users)} users")
    return users[0]


def _is_float_cast(node: Node) -> bool:
    """A cast between float dtypes on one device (which dtypes is checked later); memory formats do not matter."""
    source, result = _val(node.args[0]), _val(node)
    return (
        source.dtype.is_floating_point
        and result.dtype.is_floating_point
        and source.device == result.device
        and source.layout == result.layout == torch.strided
    )


def _per_head(factor: torch.Tensor, scores: torch.Tensor) -> bool:
    """Whether `factor` broadcasts to `scores` and is constant over its last two dimensions."""
    return factor.dim() <= scores.dim() and all(_same((size,), (1,)) for size in factor.shape[-2:])


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value != 0


def _same(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether two shapes are equal for every value of their symbols (never adds a guard)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _shape(value: torch.Tensor, transpose: bool) -> tuple[Any, ...]:
    shape = tuple(value.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if transpose else shape


def _val(node: Any) -> torch.Tensor:
    if not isinstance(node, Node) or not isinstance(node.meta.get("val"), torch.Tensor):
        raise _NoMatch(f"{node} is not a tensor with metadata")
    return node.meta["val"]
