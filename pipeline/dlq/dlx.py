"""Dead-lettering by RabbitMQ itself: the tier queues' delivery limit and DLX route,
and reading what that route delivers into the DLQ.

The pipeline counts deliveries in the state Redis and dead-letters a crash loop
itself (``max_deliveries``, see :mod:`pipeline.worker.ledger`). When that count cannot
be kept (the state store down or its keys lost), RabbitMQ's own
``x-delivery-limit`` on the quorum tier queue is the backstop: past it the broker
dead-letters the message through the DLQ's exchange into the DLQ. Without a
limit and a dead-letter exchange of ours, RabbitMQ 4 applies its default limit
of 20 and *drops* the message.

What arrives that way is the raw Celery task message, not a JSON
:class:`~pipeline.dlq.record.DeadLetterRecord`; :func:`record_from_task_message`
turns it into one (reason ``max_deliveries``, exception ``DeliveryLimit``) so
every DLQ reader, stats and replay treat both alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.core.retry import Reason
from pipeline.dlq.record import DeadLetterRecord, record_id

if TYPE_CHECKING:
    from pipeline.config.load import Settings

__all__ = ["DELIVERY_LIMIT_EXCEPTION", "DELIVERY_LIMIT_MARGIN", "delivery_limit",
           "is_task_message", "record_from_task_message", "tier_queue_arguments"]

# Deliveries RabbitMQ allows beyond a tier's max_deliveries before it dead-letters.
DELIVERY_LIMIT_MARGIN = 10
DELIVERY_LIMIT_EXCEPTION = "DeliveryLimit"  # the exception named by broker dead letters
BROKER_WORKER = "rabbitmq"  # the ``worker`` of a record RabbitMQ dead-lettered


def delivery_limit(max_deliveries: int) -> int:
    """``x-delivery-limit`` of a tier queue whose tier allows ``max_deliveries``.

    The pipeline's own count must win while the state store answers: it
    dead-letters on delivery ``max_deliveries + 1`` with the worker's context,
    whereas RabbitMQ (limit L) dead-letters after L + 1 deliveries. Deliveries
    that are not crashes count at the broker too: prefetched messages returned at
    a warm shutdown or a reconnect, and the few rejects of a state-store outage
    before the worker stops consuming (:mod:`pipeline.worker.statewatch`). The margin
    covers those, so the broker only acts when our count is gone.
    """
    return max_deliveries + DELIVERY_LIMIT_MARGIN


def tier_queue_arguments(settings: Settings, tier: str) -> dict[str, Any]:
    """Quorum-queue arguments of ``tier``'s queue on RabbitMQ.

    ``at-least-once`` dead-lettering keeps a message in the tier queue until the
    DLQ confirmed it (the default, at-most-once, can lose it); RabbitMQ requires
    ``x-overflow: reject-publish`` for that, which changes nothing here as tier
    queues have no length limit.
    """
    dlq = settings.dead_letter_queue
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit(settings.tier(tier).max_deliveries),
        "x-dead-letter-exchange": dlq,  # the DLQ's own direct exchange ...
        "x-dead-letter-routing-key": dlq,  # ... and its binding
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def is_task_message(headers: Mapping[str, Any] | None) -> bool:
    """Whether a DLQ message is a Celery task RabbitMQ dead-lettered (not a record)."""
    return bool(headers) and "x-death" in headers and "task" in headers  # type: ignore[operator]


def record_from_task_message(body: Any, headers: Mapping[str, Any],
                             settings: Settings) -> DeadLetterRecord:
    """The DLQ record of a ``pipeline.handle`` message RabbitMQ dead-lettered.

    ``body`` is the decoded Celery message: ``[args, kwargs, embed]`` (protocol 2)
    or a dict with ``args`` and ``kwargs`` (protocol 1). ``args[0]`` is the event.
    """
    args: Any = []
    kwargs: Any = {}
    if isinstance(body, Mapping):  # protocol 1
        args, kwargs = body.get("args") or [], body.get("kwargs") or {}
    elif isinstance(body, list | tuple) and len(body) >= 2:  # protocol 2
        args, kwargs = body[0] or [], body[1] or {}
    event = args[0] if args and isinstance(args[0], Mapping) else {}
    deaths = headers.get("x-death") or [{}]
    death: Mapping[str, Any] = deaths[0] if isinstance(deaths[0], Mapping) else {}
    queue = str(death.get("queue") or headers.get("x-first-death-queue") or "")
    tier = str(kwargs.get("tier") or settings.tier_for_queue(queue) or settings.default_tier)
    attempt = int(kwargs.get("attempt") or 1)
    task_id = str(headers.get("id") or "")
    died_at = _utc(death.get("time"))
    limit = (f"its queue's x-delivery-limit of "
             f"{delivery_limit(settings.tier(tier).max_deliveries)}"
             if tier in settings.tiers else "its queue's x-delivery-limit")
    message = (f"RabbitMQ dead-lettered attempt {attempt} from queue {queue} "
               f"(x-death reason {death.get('reason', headers.get('x-first-death-reason'))}, "
               f"count {death.get('count', '?')}): delivered more often than {limit} "
               f"without an acknowledgement, and the pipeline's own delivery count "
               f"did not stop it (state store unreachable?)")
    return DeadLetterRecord(
        id=record_id(task_id, attempt, Reason.MAX_DELIVERIES), event=dict(event), tier=tier,
        handler=str(kwargs.get("handler") or ""), reason=Reason.MAX_DELIVERIES,
        attempts=attempt, exception=DELIVERY_LIMIT_EXCEPTION, message=message, traceback="",
        first_failed_at=kwargs.get("first_failed_at") or died_at, last_failed_at=died_at,
        worker=BROKER_WORKER, task_id=task_id, queue=queue,
    )


def _utc(value: Any) -> datetime:
    """x-death ``time`` (a naive UTC datetime from the AMQP timestamp), else now."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.now(UTC)
