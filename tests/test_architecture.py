"""The builder's import graph: imports go one way (no circles), and the core imports its own
modules at the top (only the CLI may defer them, to keep `--help` fast)."""

from __future__ import annotations

import ast
from pathlib import Path

import builder

PACKAGE = Path(builder.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PACKAGE.rglob("*.py")}


def _imported(node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The builder modules an import statement loads (a name imported from a package counts
    as its submodule when there is one)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    base = node.module or ""
    found = {base} if base in known else set()
    found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Module-level imports, those for annotations only (TYPE_CHECKING) included: a circle
    hidden there is still a circle in the design."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found |= _imported(node, known)
        elif isinstance(node, ast.If) and _type_checking(node):
            for inner in node.body:
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    found |= _imported(inner, known)
    return found


def test_no_import_circles() -> None:
    modules = _modules()
    known = set(modules)
    # A module importing the package it is part of is not an edge: Python has imported that
    # package before any of its modules.
    graph = {
        name: {d for d in _top_level_imports(tree, known) if not name.startswith(d + ".")} - {name}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert circles == [], " ; ".join(" -> ".join(c) for c in circles)


def test_core_imports_its_modules_at_the_top() -> None:
    """No import of a builder module inside a function outside the CLI: a deferred import
    hides a circle or a cost; only the CLI defers the core, for a fast --help."""
    modules = _modules()
    known = set(modules)
    late: list[str] = []
    for name, tree in modules.items():
        if name.startswith("builder.cli"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom) and _imported(inner, known):
                        late.append(f"{name}:{inner.lineno}")
    assert late == []
