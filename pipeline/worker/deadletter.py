"""The DLQ record of a try that is dead-lettered, built on the worker.

The record carries the try's whole context (event, tier, handler, attempts, the
exception's qualified name, its message and traceback unmasked, first and last
failure times, this host, task id and queue); its id is deterministic for (task id,
attempt, reason), so a settle repeated after a lost reply writes the same record.
Writing it is the settle step's (:meth:`pipeline.worker.settle.Settling.dead_letter`).
"""

from __future__ import annotations

import socket
import traceback as tb
from datetime import UTC, datetime

from pipeline.core.retry import Reason
from pipeline.dlq.record import DeadLetterRecord, record_id
from pipeline.worker.trystate import TryState

__all__ = ["dead_letter_record", "format_trace", "now_iso"]


def dead_letter_record(at: TryState, reason: Reason, exception: str, message: str,
                       trace: str) -> DeadLetterRecord:
    """``at``'s try dead-lettered for ``reason``, failing now with ``exception``."""
    now = now_iso()
    return DeadLetterRecord(
        id=record_id(at.task_id, at.attempt, reason), event=at.event, tier=at.tier,
        handler=at.handler, reason=reason, attempts=at.attempt, exception=exception,
        message=message, traceback=trace, first_failed_at=at.first_failed_at or now,
        last_failed_at=now, worker=socket.gethostname(), task_id=at.task_id,
        queue=at.queue,
    )


def format_trace(exc: BaseException) -> str:
    """``exc``'s traceback as Python prints it."""
    return "".join(tb.format_exception(type(exc), exc, exc.__traceback__))


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
