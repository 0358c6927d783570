"""Reading the project's own source files as ASTs, for the layout and error tests."""

from __future__ import annotations

import ast
from pathlib import Path

PARSE_TRIES = 3  # attempts per file (see parse)


def parse(path: Path) -> ast.Module:
    """``path`` parsed. CPython before 3.11.8 keeps the AST constructor's recursion
    depth in state other threads share (gh-106905), so a parse that races a compile in
    a thread an earlier test left running can fail with ``SystemError`` ("AST
    constructor recursion depth mismatch"); parsing the same text again is exact."""
    text = path.read_text()
    for _ in range(PARSE_TRIES - 1):
        try:
            return ast.parse(text, filename=str(path))
        except SystemError:
            continue
    return ast.parse(text, filename=str(path))
