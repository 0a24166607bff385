"""The package's shape: no import cycle (imports inside functions counted), no oversized file.

Imports are read from the source with ``ast``: module-level and function-level ``import`` and
``from ... import`` statements and ``importlib.import_module("opendelta_dist...")`` calls with a
literal name. Imports under ``if TYPE_CHECKING:`` are left out (they never run). As in import-linter
and pydeps, importing ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and ``a.b``
whose ``__init__`` Python runs first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opendelta_dist"
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str) -> str | None:
    # the longest prefix of a dotted name that is a module of the package
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def imported_names(source: str, package: str) -> set[str]:
    """Every dotted name ``source`` imports anywhere (relative imports resolved against ``package``)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(n.name for n in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{n.name}" for n in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def imports_of(module: str) -> set[str]:
    """The package modules that ``module`` imports anywhere in its code, TYPE_CHECKING blocks aside."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = imported_names(path.read_text(), package)
    resolved = {_resolve(name) for name in names if name.split(".")[0] == "opendelta_dist"}
    return {m for m in resolved if m is not None and m != module}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def test_the_package_has_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (function-level imports counted):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_finds_cycles():
    source = """
import importlib
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from opendelta_dist.never import Ran
def f():
    from . import sibling
    from .deltas.lora import LoraModel
    importlib.import_module("opendelta_dist.deltas")
"""
    names = imported_names(source, "opendelta_dist")
    assert {"opendelta_dist.sibling", "opendelta_dist.deltas.lora", "opendelta_dist.deltas"} <= names
    assert "opendelta_dist.never" not in names
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_is_over_the_line_limit(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it (the limit is {MAX_LINES})"
