"""The package layout is the architecture: imports point one way (see README "Where things are"), with no cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "monai_trt"

# What each part may import (besides itself). Data flows patch → runtime → cache / backends → export; the bundle
# tools, the benchmark and the CLI sit on top. Lazy (function-level) imports obey the same rule.
ALLOWED = {
    "errors": set(),
    "files": set(),
    "events": set(),
    "export": {"errors"},
    "patch": {"errors"},
    "backends": {"errors", "events", "files", "export"},
    "cache": {"errors", "files", "backends"},
    "runtime": {"errors", "events", "patch", "export", "backends", "cache"},
    "console": {"events"},
    "bundle": {"errors", "events", "patch", "export", "backends", "cache", "runtime"},
    "bench": {"<root>", "errors", "events", "console", "patch", "export", "backends", "cache", "runtime", "bundle"},
    "cli": {"<root>", "errors", "events", "console", "patch", "cache", "runtime", "bundle", "bench"},
    "<root>": {"errors", "runtime"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("monai_trt", *path.relative_to(PACKAGE).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("monai_trt"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("monai_trt"))
    return out


def test_every_part_imports_only_the_layers_below_it():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        part = _part(name)
        for target in _imports(path, module_level_only=False) & set(modules):
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    modules = _modules()
    graph = {n: _imports(p, module_level_only=True) & set(modules) for n, p in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):  # a package importing its own parent is fine
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("module", ["monai_trt.export.program", "monai_trt.cache.store", "monai_trt.runtime.lifecycle"])
def test_lower_modules_import_alone_in_a_fresh_interpreter(module):
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_core_does_not_import_the_benchmark_or_its_plotting():
    code = ("import sys, torch, monai.apps.utils; before = set(sys.modules); "  # what monai itself brings in
            "import monai_trt, monai_trt.runtime, monai_trt.cache, monai_trt.cli; new = set(sys.modules) - before; "
            "print(sorted(m for m in new if m.startswith(('monai_trt.bench', 'matplotlib', 'scipy'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
