"""The one Celery task, ``pipeline.handle``: run one handler for one event, once.

Each delivery is counted before the handler runs (a crashing handler cannot
count itself); the attempt then settles exactly one way: success, a retry
written to the schedule, or a DLQ record. Only after that does Celery
acknowledge the message (``acks_late``), so a crash at any point redelivers.
If the settlement itself cannot reach the broker, the message is rejected
for redelivery rather than acknowledged.
"""

from __future__ import annotations

import logging
import socket
import time
import traceback as tb
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic
from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded

from pipeline.deadletter import DeadLetterRecord, record_id
from pipeline.errors import PermanentError, RetryAfter
from pipeline.events import Event
from pipeline.handlers import HandlerContext, registry, running
from pipeline.logs import attempt_fields
from pipeline.retry import Reason, compute_deferral, decide
from pipeline.runtime import Runtime, runtime_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TASK_NAME", "register_task"]

TASK_NAME = "pipeline.handle"
MAX_PRIORITY = 9  # the lowest of the ten priority sub-queues the app configures on Redis
log = logging.getLogger(__name__)


class Attempt:
    """One delivery of ``pipeline.handle``: the event, the handler and where it stands."""

    def __init__(self, runtime: Runtime, task_id: str, event: dict[str, Any],
                 kwargs: dict[str, Any]) -> None:
        self.rt = runtime
        self.task_id = task_id
        self.event = event
        self.handler = str(kwargs.get("handler", ""))
        tier = str(kwargs.get("tier", ""))
        self.tier = tier if tier in runtime.settings.tiers else runtime.settings.default_tier
        self.attempt = int(kwargs.get("attempt", 1))
        self.first_failed_at: str | None = kwargs.get("first_failed_at")
        self.accepted_at: float | None = kwargs.get("accepted_at")
        self.deferrals = int(kwargs.get("deferrals", 0))
        # the retry budget admitted this attempt already (deferred after it was)
        self.budget_charged = kwargs.get("budget_charged") is True

    @property
    def queue(self) -> str:
        return self.rt.settings.queue_for(self.tier)

    def run(self) -> str:
        settings = self.rt.settings
        tier = settings.tier(self.tier)
        begin = self.rt.ledger.begin(self.task_id, self.attempt, self.tier, tier,
                                     charged=self.budget_charged)
        if begin.done:
            log.info("event %s handler %s already succeeded; not running it again",
                     self.event.get("id"), self.handler,
                     extra=attempt_fields(self, outcome="already_done"))
            self.rt.ledger.clear(self.task_id, self.attempt)
            return "already_done"
        if not begin.admitted:  # a retry over the tier's retry budget
            window_s = tier.retry_budget_window_s
            return self.defer(compute_deferral(window_s / 10, spread_s=window_s / 2,
                                               deferrals=self.deferrals), "retry_budget")
        if begin.deliveries > tier.max_deliveries:
            return self.dead_letter(
                Reason.MAX_DELIVERIES, "WorkerLost",
                f"attempt {self.attempt} was delivered {begin.deliveries - 1} times and never "
                f"finished (worker killed: crash, OOM or hard kill)", "",
            )
        try:
            event = Event.model_validate(self.event)
        except pydantic.ValidationError as exc:
            return self.dead_letter_exc(Reason.INVALID_PAYLOAD, exc)
        if not self.handler:
            return self.fan_out(event)
        entry = registry.get(self.handler)
        if entry is None:
            return self.dead_letter(Reason.NO_HANDLER, "LookupError",
                                    f"no handler named {self.handler!r} on this worker", "")
        if entry.model is not None:
            try:
                entry.model.model_validate(event.payload)
            except pydantic.ValidationError as exc:
                return self.dead_letter_exc(Reason.INVALID_PAYLOAD, exc)
        ctx = HandlerContext(task_id=self.task_id, handler=self.handler, tier=self.tier,
                             attempt=self.attempt, max_attempts=tier.max_retries + 1,
                             state=self.rt.state)
        for downstream in entry.downstreams:
            status = self.rt.breakers.allow(downstream)
            if status.retry_in_s > 0:
                delay_s = compute_deferral(
                    status.retry_in_s, spread_s=self.rt.breakers.config(downstream).open_s,
                    deferrals=self.deferrals)
                return self.defer(delay_s, f"breaker_open:{downstream}")
        try:
            with running(ctx):
                entry(event)
        except RetryAfter as exc:  # the handler asks for a delay: not a failure
            return self.defer(exc.delay_s, "requested")
        except Exception as exc:
            if not isinstance(exc, PermanentError):
                for downstream in entry.downstreams:
                    self.rt.breakers.record(downstream, ok=False)
            return self.failed(exc)
        for downstream in entry.downstreams:
            self.rt.breakers.record(downstream, ok=True)
        self.rt.ledger.succeeded(self.task_id, self.attempt)
        return "succeeded"

    def requeue_priority(self) -> int | None:
        """The message priority of this event's retry or deferral: one step behind
        fresh events of its priority when the tier's ``retries_yield`` (Redis,
        where kombu serves priority 0 first; on RabbitMQ the event's own)."""
        own = self.event.get("priority")
        if not (self.rt.settings.broker_is_redis
                and self.rt.settings.tier(self.tier).retries_yield):
            return own if isinstance(own, int) else None
        return min(int(own or 0) + 1, MAX_PRIORITY)

    def defer(self, delay_s: float, why: str) -> str:
        """Run this same attempt again later: no attempt is consumed. Past the tier's
        ``max_defer_age_s`` (counted from acceptance) the work is dead-lettered."""
        tier = self.rt.settings.tier(self.tier)
        now = time.time()
        age_s = now - (self.accepted_at or now)
        if age_s + delay_s > tier.max_defer_age_s:
            return self.dead_letter(
                Reason.EXPIRED, "Deferred",
                f"deferred ({why}) for {age_s:.0f}s, past the tier's max_defer_age_s "
                f"of {tier.max_defer_age_s:g}s", "")
        spec = self.rt.publisher.spec(
            self.event, handler=self.handler, tier=self.tier, task_id=self.task_id,
            attempt=self.attempt, first_failed_at=self.first_failed_at,
            priority=self.requeue_priority(), accepted_at=self.accepted_at,
        )
        spec.kwargs["deferrals"] = self.deferrals + 1
        if why != "retry_budget":  # past the budget check: its re-run is not charged again
            spec.kwargs["budget_charged"] = True
        spec.enqueued_at = now + delay_s
        self.rt.schedule.add(spec, now + delay_s)
        self.rt.ledger.clear(self.task_id, self.attempt)
        log.info("event %s handler %s deferred %.2fs (%s)", self.event.get("id"),
                 self.handler, delay_s, why,
                 extra=attempt_fields(self, outcome="deferred", why=why))
        return f"deferred:{why}"

    def fan_out(self, event: Event) -> str:
        """The producer knew no handler for this type; this worker may know some."""
        handlers = registry.for_type(event.type)
        if not handlers:
            return self.dead_letter(Reason.NO_HANDLER, "LookupError",
                                    f"no handler registered for event type {event.type!r}", "")
        self.rt.publisher.enqueue(event, self.tier, handlers)
        self.rt.ledger.clear(self.task_id, self.attempt)
        return "fanned_out"

    def failed(self, exc: BaseException) -> str:
        tier = self.rt.settings.tier(self.tier)
        decision = decide(exc, attempt=self.attempt, tier=tier)
        if not decision.retry:
            assert decision.reason is not None
            return self.dead_letter_exc(decision.reason, exc)
        due_at = time.time() + decision.delay_s
        spec = self.rt.publisher.spec(
            self.event, handler=self.handler, tier=self.tier, task_id=self.task_id,
            attempt=self.attempt + 1, first_failed_at=self.first_failed_at or _now_iso(),
            priority=self.requeue_priority(), accepted_at=self.accepted_at,
        )
        spec.enqueued_at = due_at  # its queue wait starts when it is due
        self.rt.schedule.add(spec, due_at)
        log.warning("event %s handler %s attempt %d failed (%s: %s); retry in %.2fs",
                    self.event.get("id"), self.handler, self.attempt, type(exc).__name__, exc,
                    decision.delay_s,
                    extra=attempt_fields(self, outcome="retried", exception=_qualname(type(exc)),
                                         delay_s=round(decision.delay_s, 3)))
        self.rt.ledger.clear(self.task_id, self.attempt)
        return "retry_scheduled"

    def dead_letter_exc(self, reason: Reason, exc: BaseException) -> str:
        trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return self.dead_letter(reason, _qualname(type(exc)), str(exc), trace)

    def dead_letter(self, reason: Reason, exception: str, message: str, trace: str) -> str:
        now = _now_iso()
        record = DeadLetterRecord(
            id=record_id(self.task_id, self.attempt, reason), event=self.event, tier=self.tier,
            handler=self.handler, reason=reason, attempts=self.attempt, exception=exception,
            message=message, traceback=trace, first_failed_at=self.first_failed_at or now,
            last_failed_at=now, worker=socket.gethostname(), task_id=self.task_id,
            queue=self.queue,
        )
        self.rt.dlq.put(record)
        log.error("event %s handler %s dead-lettered: %s (%s: %s)", self.event.get("id"),
                  self.handler or "-", reason.value, exception, message,
                  extra=attempt_fields(self, outcome="dead_lettered", reason=reason.value,
                                       exception=exception))
        self.rt.ledger.clear(self.task_id, self.attempt)
        return f"dead_lettered:{reason.value}"


class PipelineTask(Task):  # type: ignore[type-arg]
    """Base class: late acks, requeue when the worker child is lost, JSON only."""

    acks_late = True
    reject_on_worker_lost = True
    ignore_result = True
    serializer = "json"
    typing = False  # kwargs are validated by the envelope, not by signature binding

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """Hard time limit: the child was killed; settle the attempt from the parent.

        Celery (5.7) calls this in the worker's main process and then reads
        ``acks_on_timeout`` to choose between ack and requeue: ack only once the
        retry or DLQ record is written, else requeue so nothing is lost (the
        delivery count still bounds a loop).
        """
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        try:
            _attempt(self.app, task_id, args, kwargs).failed(exc)
            self.acks_on_timeout = True
        except Exception:
            log.exception("could not settle task %s after its hard time limit; requeueing",
                          task_id, extra={"task_id": task_id})
            self.acks_on_timeout = False


def _attempt(app: Celery, task_id: str, args: Any, kwargs: Any) -> Attempt:
    return Attempt(runtime_for(app), task_id, dict(args[0]), dict(kwargs))


def register_task(app: Celery) -> Any:
    """Register ``pipeline.handle`` on ``app``."""

    @app.task(name=TASK_NAME, bind=True, base=PipelineTask, shared=False)
    def handle(self: PipelineTask, /, event: dict[str, Any], **kwargs: Any) -> str:
        attempt = _attempt(self.app, str(self.request.id), [event], kwargs)
        return settle_or_requeue(str(self.request.id), attempt.run)

    return handle


def settle_or_requeue(task_id: str, run: Callable[[], str]) -> str:
    """``run()``; if the broker or state store fails while the work is being settled,
    reject the message for redelivery instead of letting Celery acknowledge it."""
    try:
        return run()
    except (Reject, TimeLimitExceeded):
        raise
    except Exception as exc:
        log.exception("could not settle task %s; requeueing", task_id)
        raise Reject(exc, requeue=True) from exc


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _qualname(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
