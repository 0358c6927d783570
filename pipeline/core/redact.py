"""Payload redaction for every view of an event: one pure function, :func:`redact`.

A path names fields from the event's root, dot-separated: ``payload.card.number``.
Each segment is a glob matched against one key (``fnmatch``, case-sensitive; a
list's items are keys ``0``, ``1``, ...): ``payload.*.token`` masks ``token`` one
level under the payload. ``**`` matches any number of keys, none included:
``payload.**.password`` masks every ``password`` anywhere in the payload. A
matched field is replaced whole (an object or list too) by :data:`MASK`.

Views mask; stores do not. DLQ records, tier queues and the retry schedule keep
the event whole, because a replay must send what the producer sent. What masks:
DLQ list/show (CLI and HTTP) through :func:`redact_record`, and the ``argsrepr``
header Flower shows through :func:`redact_args`.

Failure text (an exception's message, a traceback) can quote payload values: a
``ValueError(f"bad card {card}")``, a pydantic error's ``input_value``. Its views
mask every value found at those paths wherever it appears in the text
(:func:`secrets_in`, :func:`mask_text`), when at least :data:`MIN_SECRET_CHARS` long.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MASK", "MIN_SECRET_CHARS", "ROOT", "failure_shown", "mask_text", "path_problem",
           "redact", "redact_args", "redact_record", "redact_text", "secrets_in"]

MASK = "[redacted]"  # what a masked field shows
ROOT = "payload"  # the one root key a path may start with: ids and types stay visible
ANY_DEPTH = "**"  # a segment that matches any number of keys
# shortest value masked inside failure text: masking "1" or "ok" would hide the message
MIN_SECRET_CHARS = 4

Pattern = tuple[str, ...]


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a redaction path, or None."""
    segments = path.split(".")
    if any(not s.strip() for s in segments):
        return "empty segment; write dot-separated keys like payload.card.number"
    if segments[0] != ROOT:
        return f"must start with {ROOT!r} (the event's id, type and source stay visible)"
    if len(segments) < 2:
        return f"names the whole {ROOT}; name fields in it, e.g. {ROOT}.**.token"
    return None


def redact(value: Any, paths: Sequence[str]) -> Any:
    """``value`` (an event, as a dict) with every field ``paths`` match replaced by
    :data:`MASK`. Returns a new object where something changed; never mutates
    ``value``; without paths returns ``value`` itself."""
    if not paths:
        return value
    return _walk(value, {tuple(p.split(".")) for p in paths})


def redact_record(data: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
    """A DLQ record's JSON form (``model_dump(mode="json")``) with its event masked,
    and the event's values at ``paths`` masked in its ``message`` and ``traceback``."""
    if not paths or not isinstance(data.get("event"), dict):
        return data
    found = secrets_in(data["event"], paths)
    texts = {k: mask_text(data[k], found) for k in ("message", "traceback")
             if isinstance(data.get(k), str)}
    return {**data, **texts, "event": redact(data["event"], paths)}


def failure_shown(record: Any, paths: Sequence[str]) -> dict[str, str]:
    """A DLQ record's ``message`` and ``traceback`` as views show them, masked with its
    event's values at ``paths`` (``record``: anything with ``event``, ``message`` and
    ``traceback`` attributes, as :class:`~pipeline.dlq.record.DeadLetterRecord`)."""
    found = secrets_in(record.event, paths)
    return {"message": mask_text(record.message, found),
            "traceback": mask_text(record.traceback, found)}


def secrets_in(event: Any, paths: Sequence[str]) -> list[str]:
    """Every value under a field ``paths`` match in ``event``, as text (and as JSON and
    ``repr`` quote it), at least :data:`MIN_SECRET_CHARS` long, longest first."""
    if not paths:
        return []
    leaves: list[Any] = []
    _collect(event, {tuple(p.split(".")) for p in paths}, leaves)
    found = set()
    for leaf in leaves:
        if isinstance(leaf, bool) or not isinstance(leaf, str | int | float):
            continue
        text = str(leaf)
        found |= {text, json.dumps(text)[1:-1], repr(text)[1:-1]}
    return sorted((t for t in found if len(t) >= MIN_SECRET_CHARS), key=len, reverse=True)


def mask_text(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every occurrence of each of ``secrets`` replaced by :data:`MASK`."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_text(text: str, event: Any, paths: Sequence[str]) -> str:
    """``text`` (a failure message or traceback of ``event``) with the event's values
    at ``paths`` masked."""
    return mask_text(text, secrets_in(event, paths)) if paths else text


def redact_args(args: Sequence[Any], paths: Sequence[str]) -> list[Any]:
    """A ``pipeline.handle`` task's arguments masked: the first is an event, or a
    list of events (a batch task)."""
    if not paths or not args:
        return list(args)
    first = args[0]
    shown = ([redact(e, paths) for e in first] if isinstance(first, list)
             else redact(first, paths))
    return [shown, *args[1:]]


def _walk(node: Any, patterns: set[Pattern]) -> Any:
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return node
    out: dict[Any, Any] = {}
    for key, child in items:
        rest: set[Pattern] = set()
        for pattern in patterns:
            rest.update(_advance(pattern, str(key)))
        out[key] = (MASK if () in rest else _walk(child, rest)) if rest else child
    return list(out.values()) if isinstance(node, list) else out


def _collect(node: Any, patterns: set[Pattern], out: list[Any]) -> None:
    """Append to ``out`` the leaves of every field ``patterns`` match (see :func:`_walk`)."""
    if isinstance(node, dict):
        items: Iterable[tuple[Any, Any]] = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return
    for key, child in items:
        rest: set[Pattern] = set()
        for pattern in patterns:
            rest.update(_advance(pattern, str(key)))
        if () in rest:
            _leaves(child, out)
        elif rest:
            _collect(child, rest, out)


def _leaves(node: Any, out: list[Any]) -> None:
    if isinstance(node, dict):
        for child in node.values():
            _leaves(child, out)
    elif isinstance(node, list):
        for child in node:
            _leaves(child, out)
    else:
        out.append(node)


def _advance(pattern: Pattern, key: str) -> set[Pattern]:
    """What is left of ``pattern`` after it consumed ``key`` (``()``: matched whole)."""
    head, tail = pattern[0], pattern[1:]
    if head == ANY_DEPTH:
        done: Pattern = ()
        left = {pattern} if tail else {done}  # "**" takes this key and may take more
        if tail:
            left |= _advance(tail, key)  # or takes none
        return left
    return {tail} if fnmatch.fnmatchcase(key, head) else set()
