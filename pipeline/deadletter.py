"""The dead-letter queue: work that cannot succeed, with what is needed to replay it.

The DLQ is a real broker queue (default ``dead_letter``) holding one JSON message
per :class:`DeadLetterRecord`, so broker tooling sees it. Nothing consumes it:
records stay until an operator replays or purges them. A record is published
*before* the failed task's message is acknowledged, so a crash in between
yields at worst a duplicate record (same deterministic ``id``), never a loss.
"""

from __future__ import annotations

import base64
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from kombu import Connection, Exchange, Queue
from pydantic import BaseModel, ConfigDict

from pipeline import sealing
from pipeline.queuedepth import passive_depth
from pipeline.retry import Reason
from pipeline.state import Keys

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from pipeline.config import Settings

__all__ = ["DeadLetterQueue", "DeadLetterRecord", "dead_letter_queue", "record_id"]

log = logging.getLogger(__name__)

DEAD_LETTERED_AT_HEADER = "pipeline_dead_lettered_at"  # message header: epoch seconds
_TRIM_BATCH = 1000  # most records one retention pass evicts
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


def dead_letter_queue(settings: Settings) -> Queue:
    """The kombu declaration of the DLQ (quorum queue on RabbitMQ)."""
    name = settings.dead_letter_queue
    arguments = None if settings.broker_is_redis else {"x-queue-type": "quorum"}
    return Queue(name, Exchange(name, "direct", durable=True), routing_key=name,
                 durable=True, queue_arguments=arguments)


class DeadLetterQueue:
    """Write, read and remove DLQ records on the broker.

    On Redis the DLQ is kombu's list for the queue (oldest at the right end);
    removal is by exact entry (``LREM``), and :meth:`move_to_queue` removes a
    record and enqueues its replacement task in one Lua script, so a record is
    always either in the DLQ or back on a tier queue. On RabbitMQ records are
    read with ``basic_get`` and settled by ack (removed) or requeue.
    """

    def __init__(self, app: Celery, settings: Settings, state: redis.Redis | None) -> None:
        self._app = app
        self._settings = settings
        self._sealer = sealing.sealer_from(os.environ)  # None: events stored in the clear
        self._state = state
        self.queue = dead_letter_queue(settings)
        self._move = state.register_script(_MOVE_LUA) if state is not None else None
        self._trim = state.register_script(_TRIM_LUA) if state is not None else None

    @property
    def on_redis(self) -> bool:
        return self._settings.broker_is_redis and self._state is not None

    def render(self, record: DeadLetterRecord) -> tuple[str, bytes]:
        """``(list key, message)``: the kombu Redis message :meth:`put` would push, for
        the settle step to push atomically with the try's settled mark."""
        body = orjson.dumps(self._stored(record))
        name = self.queue.name
        message = {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {DEAD_LETTERED_AT_HEADER: time.time(), "pipeline_record_id": record.id},
            "properties": {
                "delivery_mode": 2,
                "delivery_info": {"exchange": name, "routing_key": name},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
        return name, orjson.dumps(message)

    def _stored(self, record: DeadLetterRecord) -> dict[str, Any]:
        """``record`` as written: its event sealed when ``PIPELINE_DLQ_KEYS`` is set."""
        return sealing.seal_record(record.model_dump(mode="json"), self._sealer,
                                   self._settings.redact_paths)

    def _read(self, data: Any) -> DeadLetterRecord:
        """A stored record (JSON bytes, or decoded) as read: its event opened when a key
        of ours opens it. Bytes of a record never sealed take pydantic's JSON path."""
        if isinstance(data, bytes):
            if _SEALED_MARK not in data:
                return DeadLetterRecord.model_validate_json(data)
            data = orjson.loads(data)
        opened = sealing.open_record(data, self._sealer) if isinstance(data, dict) else data
        return DeadLetterRecord.model_validate(opened)

    def after_put(self) -> None:
        """Retention after a record was written (never turns a dead letter into a failure)."""
        if self.on_redis:
            try:
                self.enforce_retention()
            except Exception:
                log.exception("DLQ retention failed; will retry on the next dead letter")

    def put(self, record: DeadLetterRecord) -> None:
        """Publish ``record``, then apply retention; raises if the broker did not take it."""
        with self._app.producer_or_acquire() as producer:
            producer.publish(
                self._stored(record),
                exchange=self.queue.exchange,
                routing_key=self.queue.routing_key,
                serializer="json",
                delivery_mode=2,
                declare=[self.queue],
                headers={DEAD_LETTERED_AT_HEADER: time.time(), "pipeline_record_id": record.id},
                retry=True,
                retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                              "interval_max": 2.0},
            )
        self.after_put()

    def records(self, limit: int | None = None) -> list[DeadLetterRecord]:
        """Records, oldest first, without removing them."""
        return [record for _, record in self.entries(limit)]

    def iter_records(self, limit: int | None = None) -> Iterator[DeadLetterRecord]:
        for _, record in self.entries(limit):
            yield record

    def entries(self, limit: int | None = None) -> Iterator[tuple[bytes, DeadLetterRecord]]:
        """``(raw entry, record)`` pairs, oldest first (raw is empty on RabbitMQ)."""
        if self.on_redis:
            yield from self._iter_redis(limit)
        else:
            for _, record in self._amqp_messages(limit):
                yield b"", record

    def stats(self) -> list[Any]:
        """Records grouped by error fingerprint, largest group first (``triage``)."""
        from pipeline.triage import group_by_fingerprint  # triage builds on this module

        return group_by_fingerprint(self.iter_records())

    def depth(self) -> int:
        if self.on_redis:
            assert self._state is not None
            return int(self._state.llen(self.queue.name))
        with self._connection() as conn:
            return passive_depth(conn, self.queue.name) or 0  # not declared yet: empty

    def move_to_queue(self, moves: list[tuple[bytes, bytes, bytes]]) -> list[bool]:
        """Redis: for each ``(raw entry, list key, message)``, remove the entry and push
        the message, atomically; False where the entry was already gone."""
        assert self._move is not None
        argv: list[bytes] = [part for move in moves for part in move]
        return [bool(x) for x in self._move(keys=[self.queue.name], args=argv)]

    def remove(self, raws: list[bytes]) -> int:
        """Redis: delete these exact entries; returns how many were there."""
        assert self._state is not None
        pipe = self._state.pipeline(transaction=False)
        for raw in raws:
            pipe.lrem(self.queue.name, -1, raw)  # type: ignore[arg-type]  # bytes are fine
        return int(sum(pipe.execute()))

    def settle_amqp(self, decide: Callable[[DeadLetterRecord], bool | None]) -> tuple[int, int]:
        """RabbitMQ: read every record; ``decide`` returns True to remove it (after it
        did its work, e.g. a confirmed republish), False/None to keep it. Kept
        records are requeued when the channel closes; returns (removed, kept)."""
        removed = kept = 0
        for message, record in self._amqp_messages(self.depth()):
            if decide(record):
                message.ack()
                removed += 1
            else:
                kept += 1
        return removed, kept

    def enforce_retention(self) -> list[DeadLetterRecord]:
        """Evict the oldest records past ``dlq_max_records`` or ``dlq_max_age_s``;
        each eviction is counted (``pipeline:dlq:evictions``) and logged."""
        assert self._trim is not None
        s = self._settings
        evicted_raw = self._trim(
            keys=[self.queue.name, Keys.dlq_evictions()],
            args=[s.dlq_max_records, time.time() - s.dlq_max_age_s if s.dlq_max_age_s else 0,
                  _TRIM_BATCH],
        )
        from pipeline.triage import fingerprint  # triage builds on this module

        evicted = [self._read(_kombu_redis_body(raw)) for raw in evicted_raw]
        for record in evicted:
            log.warning("DLQ retention evicted record %s (fingerprint %s, event %s, "
                        "handler %s, %s: %s)", record.id, fingerprint(record.handler,
                        record.exception, record.message), record.event_id, record.handler,
                        record.exception, record.message[:200])
        return evicted

    def _iter_redis(self, limit: int | None) -> Iterator[tuple[bytes, DeadLetterRecord]]:
        assert self._state is not None
        # kombu LPUSHes and consumers BRPOP: the oldest record is at the right end.
        # Indexes counted from the right stay valid while new records arrive on the left.
        page_size = 1000
        end = -1
        produced = 0
        while limit is None or produced < limit:
            start = end - page_size + 1
            raw: list[bytes] = self._state.lrange(self.queue.name, start, end)  # type: ignore[assignment]
            if not raw:
                return
            for item in reversed(raw):
                yield item, self._read(_kombu_redis_body(item))
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if len(raw) < page_size:
                return
            end = start - 1

    def _amqp_messages(self, limit: int | None) -> Iterator[tuple[Any, DeadLetterRecord]]:
        # basic_get without ack, then close the channel: RabbitMQ requeues what is not acked.
        with self._connection() as conn:
            channel: Any = conn.channel()
            try:
                bound = self.queue(channel)
                bound.declare()
                produced = 0
                while limit is None or produced < limit:
                    message = bound.get(no_ack=False, accept=["json"])
                    if message is None:
                        return
                    yield message, self._amqp_record(message)
                    produced += 1
            finally:
                channel.close()

    def _amqp_record(self, message: Any) -> DeadLetterRecord:
        """A record, or a Celery task RabbitMQ dead-lettered into the DLQ (:mod:`pipeline.dlx`)."""
        from pipeline import dlx  # dlx builds on this module

        if dlx.is_task_message(message.headers):
            return dlx.record_from_task_message(message.decode(), message.headers, self._settings)
        return self._read(message.decode())

    def declare(self) -> None:
        """Declare the DLQ, its exchange and binding (the tier queues' dead-letter route)."""
        with self._connection() as conn:
            self.queue(conn.default_channel).declare()

    def _connection(self) -> Connection:
        return self._app.connection_for_read()


def _kombu_redis_body(raw: bytes) -> bytes:
    envelope = orjson.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return body if isinstance(body, bytes) else body.encode()


# ARGV: (raw entry, list key, message) * n. Remove from the tail end (oldest first).
_MOVE_LUA = """
local out = {}
for i = 1, #ARGV, 3 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    redis.call('LPUSH', ARGV[i + 1], ARGV[i + 2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV: max records (0 = no cap), oldest allowed dead-lettered-at (0 = no age cap), batch.
_TRIM_LUA = """
local evicted = {}
local max_n, min_ts, batch = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
while #evicted < batch do
  local n = redis.call('LLEN', KEYS[1])
  if n == 0 then break end
  local evict = max_n > 0 and n > max_n
  if not evict and min_ts > 0 then
    local oldest = redis.call('LINDEX', KEYS[1], -1)
    local ok, doc = pcall(cjson.decode, oldest)
    local ts = ok and doc['headers'] and doc['headers']['pipeline_dead_lettered_at']
    evict = type(ts) == 'number' and ts < min_ts
  end
  if not evict then break end
  evicted[#evicted + 1] = redis.call('RPOP', KEYS[1])
end
if #evicted > 0 then redis.call('INCRBY', KEYS[2], #evicted) end
return evicted
"""
