"""`$` expressions of bundle configs, read with Python's `ast` and never run.

What the conversion needs from them: the ids an expression references, the module object it names (`@net.to(@device)`
is `@net`), the ids that name one module object, and the value of a literal condition (`x if @flag else y`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from monai_trt.bundle.zoo.configs import MISSING, lookup, norm

REF = re.compile(r"@(\w+(?:(?:::|#)\w+)*)")
# Methods that return the very module they are called on, so `@a.to(@device)` names the same object as `@a`.
SAME_OBJECT_METHODS = frozenset({"to", "eval", "train", "cuda", "cpu", "float", "half", "double", "requires_grad_"})


@dataclass
class Expr:
    """A `$` expression parsed with its `@` references replaced by placeholder names.

    Attributes:
        tree: the parsed expression.
        refs: placeholder -> the normalized id it stands for.
        texts: placeholder -> the reference as written (`@inferer#sw_batch_size`).
    """

    tree: ast.expr
    refs: dict[str, str]
    texts: dict[str, str]

    def unparse(self, node: ast.AST) -> str:
        """Source of `node` with the placeholders turned back into references."""
        text = ast.unparse(node)
        for name, original in self.texts.items():
            text = text.replace(name, original)
        return text

    def ref(self, node: ast.AST) -> str | None:
        """The id `node` stands for when it is a bare reference (`@x`); else None."""
        return self.refs.get(node.id) if isinstance(node, ast.Name) else None


def parse_expr(text: Any) -> Expr | None:
    """Parse a `$` expression; None for anything else (plain strings, `$import` statements, bad syntax)."""
    if not isinstance(text, str) or not text.startswith("$"):
        return None
    refs: dict[str, str] = {}
    texts: dict[str, str] = {}

    def placeholder(match: re.Match) -> str:
        name = f"__ref{len(refs)}__"
        refs[name], texts[name] = norm(match.group(1)), match.group(0)
        return name

    try:
        tree = ast.parse(REF.sub(placeholder, text[1:]).strip(), mode="eval").body
    except SyntaxError:
        return None
    return Expr(tree, refs, texts)


def refs_in(text: str) -> list[str]:
    """The ids referenced in `text` (normalized), in order."""
    return [norm(m.group(1)) for m in REF.finditer(text)]


def root_ref(node: ast.AST, expr: Expr) -> str | None:
    """The id `node` names when it is `@x`, `@x.to(...)`, `@x.eval()`...: the same module object as `@x`."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SAME_OBJECT_METHODS:
        node = node.func.value
    return expr.ref(node)


def same_object_parent(value: Any) -> str | None:
    """For a config value `@x` or `$@x.to(@device)`: `x`; else None."""
    if isinstance(value, str) and value.startswith("@") and REF.fullmatch(value):
        return norm(value[1:])
    expr = parse_expr(value)
    return root_ref(expr.tree, expr) if expr else None


def alias_group(config: Mapping[str, Any], config_id: str) -> set[str]:
    """Top-level ids that name the same module object as `config_id` (through `.to(...)`-style chains)."""
    adjacency: dict[str, set[str]] = {}
    for child in config:
        parent = same_object_parent(config[child]) if isinstance(child, str) else None
        if parent is not None:
            adjacency.setdefault(child, set()).add(parent)
            adjacency.setdefault(parent, set()).add(child)
    group, todo = {norm(config_id)}, [norm(config_id)]
    while todo:
        for nxt in adjacency.get(todo.pop(), ()):
            if nxt not in group:
                group.add(nxt)
                todo.append(nxt)
    return group


class Unknown(Exception):
    """A condition whose value is not known without running the config."""


def static_value(node: ast.AST, expr: Expr, config: Mapping[str, Any]) -> Any:
    """Value of a constant, a reference to a literal config value, or `not` of those.

    Raises:
        Unknown: anything else (a call, a reference to an expression that is not literal, an undefined id).
    """
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not static_value(node.operand, expr, config)
    config_id = expr.ref(node)
    if config_id is None:
        raise Unknown
    value = lookup(config, config_id)
    if value is MISSING:
        raise Unknown
    inner = parse_expr(value)
    if inner is not None:
        return static_value(inner.tree, inner, config)
    if isinstance(value, str) and value.startswith("@"):
        raise Unknown
    return value


def live_nodes(node: ast.AST, expr: Expr, config: Mapping[str, Any]) -> Iterator[ast.AST]:
    """Nodes of `node` that can run: `a if @flag else b` with a literal `flag` yields only the branch taken."""
    yield node
    if isinstance(node, ast.IfExp):
        yield from live_nodes(node.test, expr, config)
        try:
            branches = [node.body if static_value(node.test, expr, config) else node.orelse]
        except Unknown:
            branches = [node.body, node.orelse]
    else:
        branches = list(ast.iter_child_nodes(node))
    for child in branches:
        yield from live_nodes(child, expr, config)
