"""A dead-letter record: one (event, handler) pair that gave up, and how stored records
are read back (a kombu message on the broker; its event sealed when
``PIPELINE_DLQ_KEYS`` is set, see :mod:`pipeline.dlq.sealing`).
"""

from __future__ import annotations

import base64
import os
import uuid
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict

from pipeline.core.retry import Reason
from pipeline.dlq import sealing

__all__ = ["DEAD_LETTERED_AT_HEADER", "DeadLetterRecord", "decode_body", "decode_entry",
           "read_record", "record_id"]

DEAD_LETTERED_AT_HEADER = "pipeline_dead_lettered_at"  # message header: epoch seconds
_SEALED_MARK = f'"{sealing.SEALED_KEY}":"'.encode()  # in a record's JSON only when sealed
_RECORD_NAMESPACE = uuid.UUID("0b5f4a4e-8d0e-4b8e-9c55-3f1c2f7d9a10")  # uuid5 namespace for ids


class DeadLetterRecord(BaseModel):
    """One dead-lettered piece of work: an (event, handler) pair that gave up."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    event: dict[str, Any]
    tier: str
    handler: str
    reason: Reason
    attempts: int
    exception: str
    message: str
    traceback: str
    first_failed_at: datetime
    last_failed_at: datetime
    worker: str
    task_id: str
    queue: str

    @property
    def event_id(self) -> str:
        return str(self.event.get("id", ""))


def record_id(task_id: str, attempt: int, reason: Reason) -> str:
    """Deterministic record id: a re-delivered failure writes the same id again."""
    return str(uuid.uuid5(_RECORD_NAMESPACE, f"{task_id}/{attempt}/{reason.value}"))


def _body_bytes(raw: bytes) -> bytes:
    envelope = orjson.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return body if isinstance(body, bytes) else body.encode()


def decode_entry(raw: bytes) -> DeadLetterRecord:
    """The record in one raw DLQ list entry (a kombu Redis message), its event opened
    when a key of ``PIPELINE_DLQ_KEYS`` opens it."""
    body = _body_bytes(raw)
    return read_record(body, sealing.sealer_from(os.environ) if _SEALED_MARK in body else None)


def read_record(data: Any, sealer: Any) -> DeadLetterRecord:
    """A stored record (JSON bytes, or decoded) as read: its event opened when
    ``sealer`` opens it. Bytes of a record never sealed take pydantic's JSON path."""
    if isinstance(data, bytes):
        if _SEALED_MARK not in data:
            return DeadLetterRecord.model_validate_json(data)
        data = orjson.loads(data)
    opened = sealing.open_record(data, sealer) if isinstance(data, dict) else data
    return DeadLetterRecord.model_validate(opened)


def decode_body(raw: bytes) -> dict[str, Any]:
    """The record's fields in one raw DLQ list entry, as stored (not validated: cheaper)."""
    body: dict[str, Any] = orjson.loads(_body_bytes(raw))
    return body
