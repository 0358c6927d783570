"""Putting dead-lettered work back, or deleting it — losslessly, throttled, audited.

A replayed record becomes attempt 1 of its (event, handler) task again, with the
original event id and task id, on its tier (or ``to_tier``). Idempotency holds:
if that handler already succeeded (its done mark exists) the worker does not run
it again. On Redis each batch removes the records from the DLQ and pushes their
tasks in one Lua script: killing the replay or the broker at any point leaves
every record either still in the DLQ or on a tier queue, never both, never
neither. On RabbitMQ a record is acked only after its republish is confirmed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import pydantic

from pipeline.core.events import Event
from pipeline.core.handlers import registry
from pipeline.core.state import Keys
from pipeline.dlq.query import Entry
from pipeline.dlq.queue import DeadLetterQueue
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.sealing import ENV_VAR, SEALED_KEY, is_sealed
from pipeline.dlq.triage import RecordFilter
from pipeline.errors import UnknownTier
from pipeline.messages.factory import MessageFactory
from pipeline.messages.task import TaskSpec
from pipeline.messages.taskids import event_task_id
from pipeline.producer.publisher import Publisher
from pipeline.producer.wiring import ProducerWiring

__all__ = ["ReplaySummary", "ReplayWiring", "Replayer", "would_fail_again"]

AUDIT_KEEP_ENTRIES = 10_000  # newest audit entries kept
_BATCH_MAX = 200  # records per Lua round trip when the rate allows it
Progress = Callable[[int], None]
SEALED_REFUSAL = (f"event encrypted and {ENV_VAR} holds no key that opens it: set it (the "
                  "key that sealed the record, or the keys while rotating) to replay")


@dataclass
class ReplaySummary:
    matched: int = 0
    replayed: int = 0
    already_gone: int = 0  # removed by someone else between read and replay
    would_fail: list[dict[str, str]] = field(default_factory=list)
    dry_run: bool = False
    to_tier: str | None = None
    audit_id: str = ""
    encrypted: int = 0  # records refused: no key of ours opens their event
    checked: int = 0  # records checked against the handlers (a bounded dry run: the oldest)

    def as_dict(self) -> dict[str, Any]:
        refused = {"encrypted": self.encrypted, "error": SEALED_REFUSAL} if self.encrypted else {}
        return {**refused, "matched": self.matched, "replayed": self.replayed,
                "already_gone": self.already_gone, "would_fail": len(self.would_fail),
                "would_fail_records": self.would_fail[:100], "dry_run": self.dry_run,
                "checked": self.checked,
                "to_tier": self.to_tier, "audit_id": self.audit_id}


def would_fail_again(record: DeadLetterRecord) -> str | None:
    """Why replaying ``record`` now would fail at once (its event still encrypted, no
    handler, payload rejected by the handler's current model), or None if it may."""
    if is_sealed(record.event):
        return SEALED_REFUSAL
    return would_fail_with(record.event, record.handler)


def would_fail_with(stored: dict[str, Any], handler: str) -> str | None:
    """:func:`would_fail_again` for a record's stored (opened) event and handler."""
    try:
        event = Event.model_validate(stored)
    except pydantic.ValidationError as exc:
        return f"event no longer valid: {exc.errors()[0]['msg']}"
    if not handler:
        return None if registry.for_type(event.type) else f"no handler for {event.type!r}"
    entry = registry.get(handler)
    if entry is None:
        return f"no handler named {handler!r}"
    if not entry.handles(event.type):
        return f"handler {handler!r} does not handle {event.type!r}"
    if entry.model is not None:
        try:
            entry.model.model_validate(event.payload)
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return f"payload.{where}: {first['msg']}"
    return None


class ReplayWiring(ProducerWiring, Protocol):
    """What replay needs of its app's per-process wiring (a
    :class:`pipeline.worker.runtime.Runtime` provides it): the DLQ and a publisher too."""

    @property
    def dlq(self) -> DeadLetterQueue: ...

    @property
    def publisher(self) -> Publisher: ...

    @property
    def messages(self) -> MessageFactory: ...

    def load_handlers(self) -> None: ...


class Replayer:
    """DLQ replay and purge for one runtime."""

    def __init__(self, runtime: ReplayWiring) -> None:
        self.rt = runtime
        runtime.load_handlers()  # validation and fan-out look handlers up

    def replay(self, flt: RecordFilter, *, by: str, to_tier: str | None = None,
               rate_per_s: float | None = None, dry_run: bool = False,
               validate: bool = True, force: bool = False,
               progress: Progress | None = None,
               check_limit: int | None = None) -> ReplaySummary:
        """Replay the records ``flt`` selects (``dry_run``: say what would happen). A dry
        run with ``check_limit`` reads and checks only the oldest that many, so its cost
        is bounded whatever the DLQ's size (the console's); a replay checks every record."""
        settings = self.rt.settings
        if to_tier is not None and to_tier not in settings.tiers:
            raise UnknownTier(f"to_tier {to_tier!r} is not a tier ({', '.join(settings.tiers)})")
        summary = ReplaySummary(dry_run=dry_run, to_tier=to_tier)
        chosen: list[Entry] = []
        keep = check_limit if dry_run else None
        summary.matched, matched = self.rt.dlq.query.entries(flt, keep)
        summary.checked = len(matched) if validate else 0
        for entry in matched:
            body = entry.body  # cheaper than the record: a dry run of a large group
            event = body.get("event") or {}
            if SEALED_KEY in event:  # stored sealed: opened here if a key of ours opens it
                event = entry.record.event
            sealed = is_sealed(event)  # never replayed, whatever force says
            reason = None
            if sealed:
                reason = SEALED_REFUSAL
            elif validate:
                reason = would_fail_with(event, body.get("handler", ""))
            summary.encrypted += sealed
            if reason is not None:
                summary.would_fail.append({"id": body["id"], "event_id": str(event.get("id", "")),
                                           "error": reason})
                if sealed or not force:
                    continue
            chosen.append(entry)
        if not dry_run:
            if self.rt.dlq.on_redis:
                self._move_redis(chosen, to_tier, rate_per_s, summary, progress)
            else:
                self._move_amqp({e.record.id for e in chosen}, to_tier, summary, progress)
        summary.audit_id = self.audit("replay", by, flt, summary.as_dict())
        return summary

    def purge(self, flt: RecordFilter, *, by: str) -> int:
        """Delete the matching records; returns how many."""
        if self.rt.dlq.on_redis:
            _, matched = self.rt.dlq.query.entries(flt)
            removed = self.rt.dlq.remove([(e.raw, e.seq) for e in matched])
        else:
            removed, _ = self.rt.dlq.settle_amqp(flt.matches)
        self.audit("purge", by, flt, {"purged": removed})
        return removed

    def audit(self, action: str, by: str, flt: RecordFilter, outcome: dict[str, Any]) -> str:
        entry_id = str(uuid.uuid4())
        entry = {"id": entry_id, "at": datetime.now(UTC).isoformat(), "action": action,
                 "by": by, "filter": flt.describe(), **outcome}
        pipe = self.rt.state.pipeline(transaction=False)
        pipe.lpush(Keys.dlq_audit(), orjson.dumps(entry))
        pipe.ltrim(Keys.dlq_audit(), 0, AUDIT_KEEP_ENTRIES - 1)
        pipe.execute()
        return entry_id

    def audit_entries(self, limit: int = 100) -> list[dict[str, Any]]:
        raw: list[bytes] = self.rt.state.lrange(Keys.dlq_audit(), 0, limit - 1)  # type: ignore[assignment]
        return [orjson.loads(item) for item in raw]

    def _spec(self, record: DeadLetterRecord, to_tier: str | None) -> TaskSpec:
        tier = to_tier or (record.tier if record.tier in self.rt.settings.tiers
                           else self.rt.settings.default_tier)
        task_id = record.task_id or event_task_id(record.event, record.handler,
                                                  self.rt.settings.idempotency_scope)
        # spec() starts a new lineage of tries: the settle marks of the failed run stay behind
        return self.rt.messages.spec(record.event, handler=record.handler, tier=tier,
                                     task_id=task_id, attempt=1,
                                     priority=record.event.get("priority"))

    def _move_redis(self, chosen: list[Entry], to_tier: str | None,
                    rate_per_s: float | None, summary: ReplaySummary,
                    progress: Progress | None) -> None:
        renderer = self.rt.publisher.renderer
        batch = _BATCH_MAX if not rate_per_s else max(1, min(_BATCH_MAX, int(rate_per_s / 10)))
        started = time.monotonic()
        for i in range(0, len(chosen), batch):
            if rate_per_s:
                due = started + i / rate_per_s
                time.sleep(max(0.0, due - time.monotonic()))
            moves = []
            for entry in chosen[i:i + batch]:
                key, payload = renderer.render(self._spec(entry.record, to_tier))
                moves.append((entry.raw, key, payload, entry.seq))
            moved = self.rt.dlq.move_to_queue(moves)
            summary.replayed += sum(moved)
            summary.already_gone += len(moved) - sum(moved)
            if progress is not None:
                progress(len(moves))

    def _move_amqp(self, ids: set[str], to_tier: str | None, summary: ReplaySummary,
                   progress: Progress | None) -> None:
        def decide(record: DeadLetterRecord) -> bool:
            if record.id not in ids:
                return False
            self.rt.publisher.send([self._spec(record, to_tier)])  # confirmed, else raises
            if progress is not None:
                progress(1)
            return True

        removed, _ = self.rt.dlq.settle_amqp(decide)
        summary.replayed += removed
        summary.already_gone += len(ids) - removed
