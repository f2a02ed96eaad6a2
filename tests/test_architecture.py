"""The shape of the builder and of the tile runner: imports go one way (no circles, down the
layer order), no function is longer than 80 lines, every public name has a docstring,
and each package imports its own modules at the top (only its CLI may defer them, listed with
the reason below)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tilerunner

import builder

PACKAGES = {
    "builder": Path(builder.__file__).parent,
    "tilerunner": Path(tilerunner.__file__).parent,  # base-image/runner/tilerunner
}

#: Modules (and packages) that may import their own package's modules inside functions.
DEFERRING = {
    "builder.cli": "the CLI loads a command's core modules when that command runs, for a "
    "fast `builder --help` (builder/cli/__init__.py's docstring has the figures)",
    "tilerunner.cli": "the runner's CLI loads a command's modules when that command runs: "
    "`import tilerunner.cli` takes 0.4 s, the worker with ONNX Runtime, OpenSlide and pika "
    "1.7 s (python -X importtime, 2 loaded cores), and `tilerunner contract` or `demo` load "
    "no worker, no model session",
}


def _module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path) -> dict[str, ast.Module]:
    return {
        _module_name(package, p): ast.parse(p.read_text(), str(p)) for p in package.rglob("*.py")
    }


def _imported(node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    """The package's modules an import statement loads (a name imported from a package
    counts as its submodule when there is one)."""
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


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circles(package: str) -> None:
    modules = _modules(PACKAGES[package])
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


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_core_imports_its_modules_at_the_top(package: str) -> None:
    """No import of the package's own modules inside a function outside the listed CLIs: a
    deferred import hides a circle or a cost; only a CLI defers, for the reason listed."""
    modules = _modules(PACKAGES[package])
    known = set(modules)
    late: list[str] = []
    for name, tree in modules.items():
        if any(name == d or name.startswith(d + ".") for d in DEFERRING):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import | ast.ImportFrom) and _imported(inner, known):
                        late.append(f"{name}:{inner.lineno}")
    assert late == []


def test_the_checks_see_the_runner_and_would_catch_a_circle() -> None:
    """The runner's graph is really read (its worker package included), and the circle that
    was there (the contract imported the plug-ins, which imported it back in functions)
    would be caught by the rule on deferred imports."""
    modules = _modules(PACKAGES["tilerunner"])
    assert {"tilerunner.contract", "tilerunner.param_schema", "tilerunner.worker.consumer"} <= set(
        modules
    )
    known = set(modules)
    late = ast.parse("def f():\n    from tilerunner.contract import build_contract\n")
    node = late.body[0]
    assert isinstance(node, ast.FunctionDef) and isinstance(node.body[0], ast.ImportFrom)
    assert _imported(node.body[0], known) == {"tilerunner.contract"}


# -- the layer order: imports only point down ----------------------------------------------------

#: The builder's rooms, lowest layer first: a module may import its own room and the rooms of
#: lower layers, never another room of its own layer or one above (rooms side by side know
#: nothing of each other). A room is a package of builder/, a top-level module, or the base
#: modules together; the README's Architecture table says the same in words.
LAYERS: dict[str, list[dict[str, set[str]]]] = {
    "builder": [
        {
            "base modules": {
                "builder",
                "builder.contracts",
                "builder.errors",
                "builder.fsutil",
                "builder.gitauth",
                "builder.imagename",
                "builder.paths",
                "builder.redact",
                "builder.schemas",
                "builder.settings",
                "builder.yamldoc",
            }
        },
        {"documents/": {"builder.documents"}},
        # the OCI wing knows no product, and cooking knows no OCI
        {"oci/": {"builder.oci"}, "cook/": {"builder.cook"}},
        {"image/": {"builder.image"}},
        {
            "deliver": {"builder.deliver"},
            "attest/": {"builder.attest"},
            "record": {"builder.record"},
            "publish": {"builder.publish"},
        },
        {"pipeline": {"builder.pipeline"}},
        {"fleet/": {"builder.fleet"}, "smoke": {"builder.smoke"}},
        {"audit/": {"builder.audit"}, "scaffold": {"builder.scaffold"}},
        {"cli/": {"builder.cli"}},
        {"__main__": {"builder.__main__"}},
    ],
}


def _room(name: str, layers: list[dict[str, set[str]]]) -> tuple[str, int] | None:
    """The room of module ``name`` and its layer (a package's modules are in its room; the
    package root itself only where named)."""
    root = name.split(".", maxsplit=1)[0]
    for rank, rooms in enumerate(layers):
        for room, names in rooms.items():
            if any(name == n or (n != root and name.startswith(n + ".")) for n in names):
                return room, rank
    return None


def _all_imports(tree: ast.Module, known: set[str]) -> list[tuple[int, str]]:
    """Every import of the package's modules anywhere in a module (for annotations only, and
    inside functions, included), with its line."""
    return [
        (node.lineno, target)
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for target in sorted(_imported(node, known))
    ]


def _upward_imports(modules: dict[str, ast.Module], layers: list[dict[str, set[str]]]) -> list[str]:
    """Each import that points to the importer's own layer (another room) or above."""
    known = set(modules)
    wrong: list[str] = []
    for name, tree in sorted(modules.items()):
        here = _room(name, layers)
        assert here is not None, f"{name} is in no room of the layer order: give it one"
        for line, target in _all_imports(tree, known):
            there = _room(target, layers)
            assert there is not None, f"{target} is in no room of the layer order"
            if there[0] != here[0] and there[1] >= here[1]:
                wrong.append(f"{name}:{line} imports {target} ({there[0]}, layer {there[1]})")
    return wrong


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_only_point_down_the_layer_order(package: str) -> None:
    """Every module is in a room of the layer order and imports only rooms of lower layers
    (TYPE_CHECKING and function-level imports included): the OCI wing imports no product
    room, the image room no delivery, nothing imports the CLI."""
    modules = _modules(PACKAGES[package])
    assert _upward_imports(modules, LAYERS[package]) == []


def test_the_layer_order_would_catch_an_upward_import() -> None:
    """An upward import is caught wherever it hides (for annotations only, inside a function),
    as is one between rooms side by side and a module outside every room."""
    layers = LAYERS["builder"]
    sources = {
        "builder.errors": "",
        "builder.oci.image": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from builder.attest.referrers import Attestations\n",
        "builder.image.store": "def f():\n    from builder.deliver import push\n",
        "builder.cook.load": "import builder.oci\n",
        "builder.attest.referrers": "from builder.oci import Descriptor\nfrom builder import errors\n",
        "builder.deliver": "",
        "builder.oci": "",
    }
    modules = {name: ast.parse(text) for name, text in sources.items()}
    assert _upward_imports(modules, layers) == [
        "builder.cook.load:1 imports builder.oci (oci/, layer 2)",
        "builder.image.store:2 imports builder.deliver (deliver, layer 4)",
        "builder.oci.image:3 imports builder.attest.referrers (attest/, layer 4)",
    ]
    with pytest.raises(AssertionError, match=r"builder\.newroom is in no room"):
        _upward_imports({"builder.newroom": ast.parse("")}, layers)


#: The longest a function may be: past it, a function reads as a list of named steps instead.
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_function_is_longer_than_a_screen(package: str) -> None:
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in _modules(PACKAGES[package]).items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, long


# -- every public name says what it is -----------------------------------------------------------

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _is_overload(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> bool:
    """An ``@overload`` (or ``@typing.overload``) signature: the implementation has the docstring."""
    return any(
        (isinstance(d, ast.Name) and d.id == "overload")
        or (isinstance(d, ast.Attribute) and d.attr == "overload")
        for d in node.decorator_list
    )


def _undocumented(name: str, tree: ast.Module) -> list[str]:
    """The module's public functions and classes, and the public methods (properties included)
    and nested classes of its public classes, that have no docstring."""
    found: list[str] = []
    for node in tree.body:
        if not isinstance(node, _DEFINITIONS) or node.name.startswith("_"):
            continue
        members = (
            [m for m in node.body if isinstance(m, _DEFINITIONS)]
            if isinstance(node, ast.ClassDef)
            else []
        )
        for item, label in [(node, node.name)] + [(m, f"{node.name}.{m.name}") for m in members]:
            if item.name.startswith("_") or _is_overload(item):
                continue
            if ast.get_docstring(item) is None:
                found.append(f"{name}:{item.lineno} {label}")
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_public_name_says_what_it_is(package: str) -> None:
    """Every public function, class and method (properties included) has a docstring that says
    what it is and why (a one-liner will do): a reader of the package never has to guess."""
    missing = [
        entry
        for name, tree in sorted(_modules(PACKAGES[package]).items())
        for entry in _undocumented(name, tree)
    ]
    assert missing == [], "\n".join(missing)


def test_the_docstring_gate_would_catch_a_missing_one() -> None:
    """A public function, class, method or property without a docstring is caught; private
    names, dunders and overload signatures are not."""
    tree = ast.parse(
        "def f(): pass\n"
        "def _g(): pass\n"
        "class C:\n"
        '    """A C."""\n'
        "    def __init__(self): pass\n"
        "    def m(self): pass\n"
        "    @property\n"
        "    def p(self): return 1\n"
        "    @typing.overload\n"
        "    def o(self, x: int) -> int: ...\n"
        "class _Private:\n"
        "    def m(self): pass\n"
        "class D: pass\n"
    )
    assert _undocumented("mod", tree) == ["mod:1 f", "mod:6 C.m", "mod:8 C.p", "mod:13 D"]
