"""The dead-letter queue: work that cannot succeed, with what is needed to replay it.

The DLQ is a real broker queue (default ``dead_letter``) holding one JSON message
per :class:`~pipeline.dlq.record.DeadLetterRecord`, so broker tooling sees it. Nothing consumes it:
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
from typing import TYPE_CHECKING, Any

import orjson
from kombu import Connection, Exchange, Queue

from pipeline.core.state import Keys
from pipeline.dlq import dlx, sealing
from pipeline.dlq import scripts as dlqscripts
from pipeline.dlq.index import RAW_HASH_CHARS, DlqIndex, entry_meta
from pipeline.dlq.query import DlqQuery
from pipeline.dlq.record import DEAD_LETTERED_AT_HEADER, DeadLetterRecord, decode_entry, read_record
from pipeline.dlq.triage import fingerprint
from pipeline.producer.queuedepth import passive_depth

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from pipeline.config.model import Settings

__all__ = ["DeadLetterQueue", "dead_letter_queue"]

log = logging.getLogger(__name__)

_TRIM_BATCH = 1000  # most records one retention pass evicts
_REMOVE_BATCH = 200  # records one purge step removes


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
    always either in the DLQ or back on a tier queue. Every write and removal
    updates the DLQ's index in the same script (:mod:`pipeline.dlq.index`). On
    RabbitMQ records are read with ``basic_get`` and settled by ack (removed) or
    requeue; there is no index.
    """

    def __init__(self, app: Celery, settings: Settings, state: redis.Redis | None) -> None:
        self._app = app
        self._settings = settings
        self._sealer = sealing.sealer_from(os.environ)  # None: events stored in the clear
        self._state = state
        self.queue = dead_letter_queue(settings)
        self.index: DlqIndex | None = None
        if state is not None and settings.broker_is_redis:
            self.index = DlqIndex(state, self.queue.name, settings.redact_paths)
            self._push = state.register_script(dlqscripts.PUSH_LUA)
            self._move = state.register_script(dlqscripts.MOVE_LUA)
            self._remove = state.register_script(dlqscripts.REMOVE_LUA)
            self._trim = state.register_script(dlqscripts.TRIM_LUA)

    @property
    def on_redis(self) -> bool:
        return self.index is not None

    @property
    def query(self) -> DlqQuery:
        """Groups, filtered records and lookups, by the index when it is usable."""
        return DlqQuery(self)

    def index_args(self, record: DeadLetterRecord, raw: bytes) -> tuple[str, str, str]:
        """What the settle step needs to index the entry ``raw`` of ``record``."""
        assert self.index is not None
        return (self.index.prefix, *entry_meta(record, raw, self._settings.redact_paths))

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
        """A stored record as read (:func:`read_record`) with this queue's keys."""
        return read_record(data, self._sealer)

    def after_put(self) -> None:
        """Retention after a record was written (never turns a dead letter into a failure)."""
        if self.on_redis:
            try:
                self.enforce_retention()
            except Exception:
                log.exception("DLQ retention failed; will retry on the next dead letter")

    def put(self, record: DeadLetterRecord) -> None:
        """Publish ``record``, then apply retention; raises if the broker did not take it."""
        if self.on_redis:  # the message kombu would push, and its index entry, in one step
            key, raw = self.render(record)
            prefix, meta, message = self.index_args(record, raw)
            self._push(keys=[key], args=[prefix, raw, meta, message])
            self.after_put()
            return
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
        """Records, oldest first, without removing them (reads every record)."""
        return list(self.iter_records(limit))

    def iter_records(self, limit: int | None = None) -> Iterator[DeadLetterRecord]:
        return (record for _, record in self.entries(limit))

    def entries(self, limit: int | None = None) -> Iterator[tuple[bytes, DeadLetterRecord]]:
        """``(raw entry, record)`` pairs, oldest first (raw is empty on RabbitMQ)."""
        if self.on_redis:
            yield from self._iter_redis(limit)
        else:
            for _, record in self._amqp_messages(limit):
                yield b"", record

    def stats(self) -> list[Any]:
        """Records grouped by error fingerprint, largest group first (``triage``)."""
        return self.query.groups()

    def depth(self) -> int:
        if self.on_redis:
            assert self._state is not None
            return int(self._state.llen(self.queue.name))
        with self._connection() as conn:
            return passive_depth(conn, self.queue.name) or 0  # not declared yet: empty

    def move_to_queue(self, moves: list[tuple[bytes, bytes, bytes, str]]) -> list[bool]:
        """Redis: for each ``(raw entry, list key, message, index seq)``, remove the entry
        (and its index entry) and push the message, atomically; False where the entry
        was already gone."""
        assert self.index is not None
        argv: list[bytes | str] = [part for move in moves for part in move]
        return [bool(x) for x in self._move(keys=[self.queue.name],
                                            args=[self.index.prefix, *argv])]

    def remove(self, entries: list[tuple[bytes, str]]) -> int:
        """Redis: delete these exact ``(raw entry, index seq)`` entries with their index
        entries; returns how many were there."""
        assert self.index is not None
        removed = 0
        for i in range(0, len(entries), _REMOVE_BATCH):
            argv = [part for entry in entries[i:i + _REMOVE_BATCH] for part in entry]
            removed += int(self._remove(keys=[self.queue.name],
                                        args=[self.index.prefix, *argv]))
        return removed

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
        assert self.index is not None
        s = self._settings
        evicted_raw = self._trim(
            keys=[self.queue.name, Keys.dlq_evictions()],
            args=[self.index.prefix, s.dlq_max_records,
                  time.time() - s.dlq_max_age_s if s.dlq_max_age_s else 0, _TRIM_BATCH,
                  RAW_HASH_CHARS],
        )
        evicted = [decode_entry(raw) for raw in evicted_raw]
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
                yield item, decode_entry(item)
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
        """A record, or a Celery task RabbitMQ dead-lettered into the DLQ
        (:mod:`pipeline.dlq.dlx`)."""
        if dlx.is_task_message(message.headers):
            return dlx.record_from_task_message(message.decode(), message.headers, self._settings)
        return self._read(message.decode())

    def declare(self) -> None:
        """Declare the DLQ, its exchange and binding (the tier queues' dead-letter route)."""
        with self._connection() as conn:
            self.queue(conn.default_channel).declare()

    def _connection(self) -> Connection:
        return self._app.connection_for_read()
