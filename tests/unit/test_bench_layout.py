"""bench/'s layout (issue 18), read with ast, nothing run: functions of at most 60
lines, modules of at most 300, one module under bench/scenarios/ per scenario the
dispatcher offers, and every bench module a worker or subprocess loads by name
exists."""

from __future__ import annotations

import ast
import itertools
import json
import re
from pathlib import Path

import pytest

from tests.unit.sources import parse

BENCH = Path(__file__).resolve().parents[2] / "bench"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 300
MODULES = sorted(BENCH.rglob("*.py"))
HANDLER_MODULES = re.compile(r"handler_modules = (\[[^\]]*\])")


def _rel(path: Path) -> str:
    return str(path.relative_to(BENCH.parent))


def _tree(path: Path) -> ast.Module:
    return parse(path)


def test_the_walk_finds_bench() -> None:
    assert BENCH / "__main__.py" in MODULES
    assert BENCH / "common.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_module_at_most_300_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{_rel(path)}: {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_functions_at_most_60_lines(path: Path) -> None:
    """Methods and nested functions too, decorators included."""
    too_long = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            assert node.end_lineno is not None
            if (lines := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                too_long.append(f"{node.name} (line {node.lineno}): {lines} lines")
    assert not too_long, f"{_rel(path)}: {too_long}"


def _dispatcher() -> tuple[ast.Module, tuple[str, ...]]:
    tree = _tree(BENCH / "__main__.py")
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "SCENARIOS" for t in node.targets):
            return tree, tuple(ast.literal_eval(node.value))
    raise AssertionError("bench/__main__.py has no SCENARIOS")


def test_each_scenario_is_a_module_under_scenarios_with_main() -> None:
    tree, scenarios = _dispatcher()
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)
               and isinstance(n.values[0], ast.Constant)
               and n.values[0].value == "bench.scenarios."]
    assert imports, "the dispatcher no longer imports bench.scenarios.<name>"
    modules = {p.stem for p in (BENCH / "scenarios").glob("*.py") if p.stem != "__init__"}
    assert set(scenarios) == modules, "bench/scenarios/ holds exactly the scenarios"
    for name in scenarios:
        tree = _tree(BENCH / "scenarios" / f"{name}.py")
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name


def _named_modules(path: Path) -> list[str]:
    """Module names ``path`` hands to other processes: after ``-A``/``-m`` in an argv,
    and in a ``handler_modules`` list (TOML or PIPELINE_HANDLER_MODULES JSON)."""
    names = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.List):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            names += [b for a, b in itertools.pairwise(items)
                      if a in ("-A", "-m") and isinstance(b, str)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith('["'):
                names += json.loads(node.value)
            names += [n for m in HANDLER_MODULES.findall(node.value) for n in json.loads(m)]
    return [n for n in names if n.split(".")[0] == "bench"]


def test_modules_named_for_workers_exist() -> None:
    named = {n: _rel(p) for p in MODULES for n in _named_modules(p)}
    assert {"bench.handlers", "bench.stock_app", "bench.seed.stock"} <= set(named)
    for name, where in named.items():
        base = BENCH.parent.joinpath(*name.split("."))
        assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file(), \
            f"{where} names {name}, which does not exist"
