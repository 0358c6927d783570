"""The package's layout (issue 18): wings whose imports run one way, no import cycles,
no imports hidden in functions, short modules and functions, and an architecture
document that lists what is there.

The layering contract lives in pyproject.toml (``[tool.importlinter]``); import-linter
checks it on every import, those inside functions and under ``TYPE_CHECKING`` included,
so an import moved into a function cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Set
from pathlib import Path
from typing import cast

import grimp

from tests.unit.sources import parse

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
MODULE_MAX_LINES = 300  # lines per module, docstring included
FUNCTION_MAX_LINES = 60  # lines per function, from `def` to its last line, nested ones in
LAZY_IMPORT_WINGS = ("cli",)  # a command imports what it runs (uvicorn, Flower) when it runs


def modules() -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, parse(path)


def cycles(edges: Mapping[str, Set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_wings_layering_contract_is_kept() -> None:
    # In its own process: import-linter configures logging, which other tests capture.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache", "--config", "pyproject.toml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_no_module_of_the_package_is_in_an_import_cycle() -> None:
    graph = grimp.build_graph("pipeline", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert cycles(edges) == []


def test_the_cycle_finder_reports_each_cycle_once() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": {"e"}}
    assert cycles(edges) == [["a", "b", "c"], ["e", "e2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_functions_import_nothing_of_the_pipeline_outside_the_cli() -> None:
    hidden = []
    for path, tree in modules():
        if path.relative_to(PACKAGE).parts[0] in LAZY_IMPORT_WINGS:
            continue
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                hidden += [f"{path.relative_to(ROOT)}:{cast(ast.stmt, node).lineno} {name}"
                           for name in names if name.split(".")[0] == "pipeline"]
    assert hidden == []


def test_no_module_imports_from_the_package_root() -> None:
    """``pipeline/__init__`` imports the wings; a wing importing it back would be a cycle."""
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for path, tree in modules() if path != PACKAGE / "__init__.py"
             for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module == "pipeline"]
    assert found == []


def test_every_module_is_at_most_300_lines() -> None:
    long = {str(path.relative_to(ROOT)): n for path, _ in modules()
            if (n := len(path.read_text().splitlines())) > MODULE_MAX_LINES}
    assert long == {}


def test_every_function_is_at_most_60_lines() -> None:
    long = {}
    for path, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > FUNCTION_MAX_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}


def test_the_architecture_document_lists_every_module_and_nothing_else() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"`(pipeline/[\w/]+\.py)`", text))
    documented_inits = (PACKAGE, PACKAGE / "http" / "console")  # wings go by their modules
    present = {str(path.relative_to(ROOT)) for path, _ in modules()
               if path.name != "__init__.py" or path.parent in documented_inits}
    assert sorted(present - listed) == [], "modules the document does not name"
    assert sorted(listed - present) == [], "names in the document that are not modules"
