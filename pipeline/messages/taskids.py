"""Deterministic task ids: one per (event, handler), within the event's source.

A re-publish of an event reuses its task ids (so its done marks dedupe it), and the
same event id from two sources is two tasks unless ``idempotency_scope = "global"``.
Every place that derives one (publish, a batch's events on the worker, DLQ replay)
calls :func:`event_task_id`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["event_task_id", "task_id_for"]

_TASK_NAMESPACE = uuid.UUID("6a1f0b7e-3c4d-4f5a-8b9c-0d1e2f3a4b5c")  # uuid5 namespace for task ids
_NAMESPACE_BYTES = _TASK_NAMESPACE.bytes


def task_id_for(event_id: uuid.UUID | str, handler: str, source: str | None = None) -> str:
    """Deterministic task id for (event, handler), within ``source``: a re-publish
    reuses it, and the same event id from two sources is two tasks (two done marks).

    ``uuid.uuid5(_TASK_NAMESPACE, f"{source}|{event_id}/{handler}")`` (without
    ``source``, as under ``idempotency_scope = "global"``: ``f"{event_id}/{handler}"``),
    formatted without building UUID objects (it runs once per published task).
    """
    name = f"{event_id}/{handler}" if source is None else f"{source}|{event_id}/{handler}"
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event_task_id(event: Mapping[str, Any], handler: str, scope: str) -> str:
    """The task id of ``event`` (a message's event dict) for ``handler``: namespaced by
    its source unless ``scope`` (``idempotency_scope``) is ``global``. Every place that
    derives one (publish, a batch's events on the worker, replay) calls this."""
    source = str(event.get("source", "")) if scope == "source" else None
    return task_id_for(str(event.get("id")), handler, source)
