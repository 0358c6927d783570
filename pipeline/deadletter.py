"""The dead-letter queue: work that cannot succeed, with what is needed to replay it.

The DLQ is a real broker queue (default ``dead_letter``) holding one JSON message
per :class:`DeadLetterRecord`, so broker tooling sees it. Nothing consumes it:
records stay until an operator replays or purges them. A record is published
*before* the failed task's message is acknowledged, so a crash in between
yields at worst a duplicate record (same deterministic ``id``), never a loss.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from kombu import Connection, Exchange, Queue
from pydantic import BaseModel, ConfigDict

from pipeline.retry import Reason

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from pipeline.config import Settings

__all__ = ["DeadLetterQueue", "DeadLetterRecord", "dead_letter_queue", "record_id"]

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
    """Write and read DLQ records on the broker."""

    def __init__(self, app: Celery, settings: Settings, state: redis.Redis | None) -> None:
        self._app = app
        self._settings = settings
        self._state = state
        self.queue = dead_letter_queue(settings)

    def put(self, record: DeadLetterRecord) -> None:
        """Publish ``record``; raises if the broker did not take it."""
        with self._app.producer_or_acquire() as producer:
            producer.publish(
                record.model_dump(mode="json"),
                exchange=self.queue.exchange,
                routing_key=self.queue.routing_key,
                serializer="json",
                delivery_mode=2,
                declare=[self.queue],
                retry=True,
                retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5,
                              "interval_max": 2.0},
            )

    def records(self, limit: int | None = None) -> list[DeadLetterRecord]:
        """Records, oldest first, without removing them."""
        return list(self.iter_records(limit))

    def iter_records(self, limit: int | None = None) -> Iterator[DeadLetterRecord]:
        if self._settings.broker_is_redis and self._state is not None:
            yield from self._iter_redis(limit)
        else:
            yield from self._iter_amqp(limit)

    def depth(self) -> int:
        if self._settings.broker_is_redis and self._state is not None:
            return int(self._state.llen(self.queue.name))
        with self._connection() as conn:
            declared: Any = self.queue(conn.default_channel).queue_declare(passive=True)
            return int(declared.message_count)

    def _iter_redis(self, limit: int | None) -> Iterator[DeadLetterRecord]:
        assert self._state is not None
        # kombu LPUSHes and consumers BRPOP: the oldest record is at the right end.
        page_size = 1000
        end = -1
        produced = 0
        while limit is None or produced < limit:
            start = end - page_size + 1
            raw: list[bytes] = self._state.lrange(self.queue.name, start, end)  # type: ignore[assignment]
            if not raw:
                return
            for item in reversed(raw):
                yield _decode_kombu_redis(item)
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if len(raw) < page_size:
                return
            end = start - 1

    def _iter_amqp(self, limit: int | None) -> Iterator[DeadLetterRecord]:
        # basic_get without ack, then close the channel: RabbitMQ requeues them all.
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
                    yield DeadLetterRecord.model_validate(message.decode())
                    produced += 1
            finally:
                channel.close()

    def _connection(self) -> Connection:
        return self._app.connection_for_read()


def _decode_kombu_redis(raw: bytes) -> DeadLetterRecord:
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return DeadLetterRecord.model_validate_json(body)
