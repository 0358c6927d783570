"""Every error the pipeline raises on purpose derives from ``PipelineError``, and
``errors.py``'s drawn hierarchy is the real one."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pipeline.errors as errors
from tests.unit.sources import parse

PACKAGE = Path(errors.__file__).parent
# pydantic turns these into its own ValidationError, which the callers report by field
VALIDATOR_DECORATORS = {"field_validator", "model_validator", "validator"}
# not errors of ours: a module __getattr__'s protocol, an unreachable branch, exiting
PROTOCOL_ERRORS = {"AttributeError", "AssertionError", "NotImplementedError", "SystemExit"}
BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)}


def _decorator_names(node: ast.AST) -> set[str]:
    names = set()
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def builtin_raises() -> list[str]:
    """``file:line name`` of each ``raise <builtin error>(...)`` outside a pydantic
    validator (a bare ``raise`` or a re-raise of a caught error is not deliberate)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = parse(path)
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if _decorator_names(func) & VALIDATOR_DECORATORS:
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                    name = getattr(node.exc.func, "id", "")
                    if name in BUILTIN_ERRORS and name not in PROTOCOL_ERRORS:
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
    return sorted(set(found))


def test_no_deliberate_error_is_a_bare_builtin_exception() -> None:
    assert builtin_raises() == []


def drawn_tree() -> dict[str, str]:
    """``{class: parent}`` from the tree in ``errors.py``'s docstring."""
    doc = (errors.__doc__ or "").split("Hierarchy::", 1)[1]
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        match = re.match(r"^[\s│├└─]*([A-Z]\w+)(?:\s|$)", line)
        if not match:
            continue
        depth = len(line) - len(line.lstrip(" │├└─"))
        name = match.group(1)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[name] = stack[-1][1]
        stack.append((depth, name))
    return parents


def test_the_hierarchy_drawn_in_errors_is_the_real_one() -> None:
    drawn = drawn_tree()
    exported = {name for name in errors.__all__
                if isinstance(cls := getattr(errors, name), type) and issubclass(cls, Exception)}
    assert set(drawn) | {"PipelineError"} == exported
    for name, parent in drawn.items():
        cls = getattr(errors, name)
        assert getattr(errors, parent) in cls.__bases__, f"{name} is not a {parent}"
