"""How the configuration reference words a model's fields: meaning, type, default.

Pure functions over pydantic models and values, with no knowledge of the document
they end up in (that is :mod:`tools.docgen`):

* :func:`field_comments`: the ``#:`` comment lines directly above each field in
  the model's source, a field's meaning when it has no ``description``;
* :func:`describe_type`: an annotation and its constraints in words
  (``int, ≥ 1, ≤ 512``, ``float, > 0, or unset``, ``"reject" or "accept"``);
* :func:`format_value`: a default as it is written in TOML, with a readable
  size or duration (``16777216`` is ``16 MiB``, ``86400`` seconds ``1 day``).
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

__all__ = ["describe_type", "field_comments", "field_default", "format_value"]


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """``#:`` comment blocks directly above each annotated field of ``model``'s class body
    (inherited fields from the bases, overridden by the class's own)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            continue
        if cls.__module__.partition(".")[0] != model.__module__.partition(".")[0]:
            continue  # pydantic's own bases declare no settings
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        tree = ast.parse(source)
        body = tree.body[0]
        assert isinstance(body, ast.ClassDef)
        for node in body.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            block: list[str] = []
            i = node.lineno - 2  # the line above, 0-based
            while i >= 0 and lines[i].strip().startswith("#:"):
                block.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if block:
                found[node.target.id] = " ".join(block)
    return found


def describe_type(annotation: Any, metadata: list[Any] | None = None) -> str:
    """``int, ≥ 1, ≤ 512``, ``float, > 0, or unset``, ``"reject" or "accept"``, ..."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        text = " or ".join(describe_type(a) for a in args if a is not type(None))
        return _with_constraints(text, metadata or []) + (
            ", or unset" if type(None) in args else "")
    if origin is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        return describe_type(base, extra + list(metadata or []))
    return _with_constraints(_base_type(annotation), metadata or [])


def _base_type(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " or ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`"
                           for a in typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "list of tables"
        return f"list of {describe_type(item)}"
    if origin is dict:
        _, value = typing.get_args(annotation)
        if isinstance(value, type) and issubclass(value, BaseModel):
            return "table of tables"
        if value is SecretStr:
            return "table of secret strings"
        return "table"
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _with_constraints(text: str, metadata: list[Any]) -> str:
    bounds: dict[str, Any] = {}
    pattern = None
    for item in metadata:
        items = item.metadata if isinstance(item, FieldInfo) else [item]
        for m in items:
            for attr in ("gt", "ge", "lt", "le"):
                if isinstance(m, getattr(annotated_types, attr.capitalize())):
                    bounds[attr] = getattr(m, attr)
            pattern = getattr(m, "pattern", None) or pattern
    parts = []
    for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
        if attr in bounds:
            parts.append(f"{sign} {_number(bounds[attr])}")
    if pattern:
        parts.append(f"matching `{pattern}`")
    return f"{text}, {', '.join(parts)}" if parts else text


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)


def format_value(value: Any, name: str = "") -> str:
    """A default as it would be written in TOML, with a readable size or duration."""
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, list):
        return "`[" + ", ".join(_plain(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`" if not value else "`{" + ", ".join(
            f"{_plain(k)} = {_plain(v)}" for k, v in value.items()) + "}`"
    text = f"`{value}`"
    human = _humanise(value, name)
    return f"{text} ({human})" if human else text


def _plain(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _humanise(value: Any, name: str) -> str:
    if not isinstance(value, int) or value <= 0:
        return ""
    if name.endswith("_bytes") and value >= 1024:
        for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
            if value % size == 0:
                return f"{value // size} {unit}"
    if name.endswith("_s") and value >= 3600:
        for unit, size in (("day", 86400), ("hour", 3600)):
            if value % size == 0:
                n = value // size
                return f"{n} {unit}{'s' if n != 1 else ''}"
    return ""


def field_default(info: FieldInfo) -> Any:
    """The field's default value, its ``default_factory`` called if it has one."""
    if info.default_factory is not None:
        return info.default_factory()  # type: ignore[call-arg]
    return info.default
