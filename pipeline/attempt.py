"""One try of one (event, handler) task: the steps every delivery goes through.

A single-event message (``pipeline.handle``) is one :class:`Attempt`; a batch
message (``pipeline.handle_batch``) is one per event, run one after the other
through the same :meth:`Attempt.run`:

1. **begin** (:meth:`pipeline.ledger.Ledger.begin`): already done or settled ->
   acknowledge without running; an earlier delivery of this try was lost -> settle
   it as a failed attempt (``WorkerLostError``) without running; over the retry
   budget -> defer;
2. **checks**: the event envelope, the handler (or fan out), that the handler is
   registered for the event's type and the handler's payload model (both
   ``invalid_payload``), the downstreams' circuit breakers (defer);
3. **the handler**;
4. **settle** exactly one outcome, atomically with the try's settled mark: the done
   mark, a retry or deferral in the schedule, or a DLQ record.

:meth:`Attempt.run` returns the outcome as a string (what the metrics label) and
leaves in :attr:`Attempt.verdict` what the task raises afterwards to give Celery's
task state the same outcome (:mod:`pipeline.taskstate`).

Every exit after a breaker let the attempt through records or releases it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback as tb
import uuid
from datetime import UTC, datetime
from typing import Any

import pydantic
import redis
from billiard.exceptions import WorkerLostError

from pipeline.batchledger import BatchLedger
from pipeline.deadletter import DeadLetterRecord, record_id
from pipeline.errors import PermanentError, RetryAfter
from pipeline.events import Event
from pipeline.handlers import HandlerContext, registry, running
from pipeline.ledger import Begin, Outcome, Try, try_key
from pipeline.logs import attempt_fields
from pipeline.messages import TaskSpec
from pipeline.redact import mask_text, secrets_in
from pipeline.retry import Reason, compute_deferral, decide
from pipeline.runtime import Runtime
from pipeline.taskstate import DeadLettered, Deferred, RetryScheduled, Verdict, masked_cause

__all__ = ["Attempt"]

log = logging.getLogger(__name__)

MAX_PRIORITY = 9  # the lowest of the ten priority sub-queues the app configures on Redis
SETTLE_RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # pauses between settle tries
RECHECK_MARGIN_S = 5.0  # beyond a try's hard time limit before its silence means it was lost
# tokens of the tries this process runs now (a single task's, and every try of a batch
# it has claimed): a delivery of one of them is never judged lost here, however old
LIVE_CLAIMS: set[str] = set()
RECHECK_MIN_S = 1.0  # soonest look again at a try still running in this process


class Attempt:
    """One delivery of one try: the event, the handler and where it stands."""

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
        self.lineage = str(kwargs.get("lineage", ""))  # each publish (and replay) starts one
        self.lost = int(kwargs.get("lost", 0))  # earlier tries lost with their process
        # the retry budget admitted this attempt already (deferred after it was)
        self.budget_charged = kwargs.get("budget_charged") is True
        self.key = try_key(self.attempt, self.deferrals, self.lineage)
        self.token = uuid.uuid4().hex  # names this delivery in the running mark
        self.only_if_running = False  # settle only a try that began (hard time limit)
        self.settled_now = False  # the last settle wrote this try's outcome
        self.batch: BatchLedger | None = None  # a batch's: starts and done settles streamed
        self.started = False  # a batch's try: its start was written
        self.following: Attempt | None = None  # a batch's next try, started by this settle
        self.begun: Begin | None = None  # this try's begin, done for the whole batch
        self.verdict: Verdict | None = None  # how it settled if not as a success (task state)

    def masked(self, text: str) -> str:
        """``text`` (failure text) with this event's ``redact_paths`` values masked: what
        logs and Celery's task state show; the DLQ record keeps it whole."""
        return mask_text(text, secrets_in(self.event, self.rt.settings.redact_paths))

    @property
    def queue(self) -> str:
        return self.rt.settings.queue_for(self.tier)

    def run(self) -> str:
        if self.batch is not None:  # the batch lists its tries' tokens itself
            return self._run()
        LIVE_CLAIMS.add(self.token)  # a thread or greenlet of this process runs it
        try:
            return self._run()
        finally:
            LIVE_CLAIMS.discard(self.token)

    def _run(self) -> str:
        tier = self.rt.settings.tier(self.tier)
        begin = self.begun or self.rt.ledger.begin(self.as_try())
        if begin.verdict == "lost" and begin.pending and self.previous_gone(begin):
            begin = self.rt.ledger.take_over(self.as_try(), begin.previous)
        if begin.verdict in ("done", "settled"):
            log.info("event %s handler %s %s; not running it again", self.event.get("id"),
                     self.handler, "already succeeded" if begin.verdict == "done"
                     else f"try {self.key} already settled",
                     extra=attempt_fields(self, outcome=f"already_{begin.verdict}"))
            return f"already_{begin.verdict}"
        if begin.verdict == "lost":
            if not self.previous_gone(begin):  # that delivery may still be running
                return self.recheck(max(self.longest_run_s() - begin.age_s, RECHECK_MIN_S))
            return self.was_lost(begin.previous)
        if begin.verdict == "over_budget":
            window_s = tier.retry_budget_window_s
            return self.defer(compute_deferral(window_s / 10, spread_s=window_s / 2,
                                               deferrals=self.deferrals), "retry_budget")
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
        if not entry.handles(event.type):  # a crafted DLQ record or a task applied by hand
            return self.dead_letter(Reason.INVALID_PAYLOAD, "TypeError",
                                    f"handler {self.handler!r} handles {entry.pattern!r}, not "
                                    f"event type {event.type!r}; not run", "")
        if entry.model is not None:
            try:
                entry.model.model_validate(event.payload)
            except pydantic.ValidationError as exc:
                return self.dead_letter_exc(Reason.INVALID_PAYLOAD, exc)
        ctx = HandlerContext(task_id=self.task_id, handler=self.handler, tier=self.tier,
                             attempt=self.attempt, max_attempts=tier.max_retries + 1,
                             state=self.rt.state)
        breakers = self.rt.breakers
        allowed: list[tuple[str, str | None]] = []  # (downstream, probe lease) let through
        try:
            for downstream in entry.downstreams:
                status = breakers.allow(downstream, token=self.breaker_token(downstream))
                if status.retry_in_s > 0:
                    delay_s = compute_deferral(
                        status.retry_in_s, spread_s=breakers.config(downstream).open_s,
                        deferrals=self.deferrals)
                    return self.defer(delay_s, f"breaker_open:{downstream}")
                allowed.append((downstream, status.token))
            if self.batch is not None and not self.started:  # a batch's claim starts
                self.started = True
                self.batch.start(self.as_try())
            try:
                with running(ctx):
                    entry(event, timeout_s=tier.soft_time_limit_s)
            except RetryAfter as exc:  # the handler asks for a delay: not a failure
                return self.defer(exc.delay_s, "requested")
            except Exception as exc:
                if not isinstance(exc, PermanentError):
                    for downstream, token in allowed:
                        breakers.record(downstream, ok=False, token=token)
                return self.failed(exc)
            for downstream, token in allowed:
                breakers.record(downstream, ok=True, token=token)
            self.settle(Outcome("done"))
            return "succeeded"
        finally:  # every exit gives back a probe slot it did not settle (no-op if it did)
            for downstream, token in allowed:
                breakers.release(downstream, token)

    def previous_gone(self, begin: Begin) -> bool:
        """Whether the delivery that left ``begin``'s mark can no longer be running:
        its process is gone (this host) or it is older than a try can run; never while
        a thread or greenlet of this process runs it (a threads or gevent pool does
        not stop a synchronous handler at its hard time limit)."""
        host, pid = begin.previous_process
        if host == socket.gethostname() and pid == os.getpid():
            if begin.previous.split()[0].lstrip("~") in LIVE_CLAIMS:
                return False  # still running here: a thread or greenlet past its limit
            if begin.pending:
                return True  # its batch has ended
        gone = host == socket.gethostname() and pid != os.getpid() and not _alive(pid)
        return gone or begin.age_s >= self.longest_run_s()

    def breaker_token(self, downstream: str) -> str:
        """This try's probe lease on ``downstream``: the main process can settle it
        after a hard time limit killed the child that held it."""
        return f"{self.task_id}:{self.key}:{downstream}"

    # -- outcomes ------------------------------------------------------------------
    def settle(self, outcome: Outcome) -> bool:
        """Write ``outcome`` for this try (retried: the step is idempotent); False when
        the try had settled already. Raises when the state store stays unreachable."""
        if self.batch is not None and outcome.kind == "done" and not self.only_if_running:
            after = self.following
            if after is not None and (after.begun is None or after.begun.verdict != "run"):
                after = None
            if after is not None:  # the next try starts in the same call
                after.started = True
            self.batch.settle_done(self.as_try(), after.as_try() if after else None,
                                   redo=lambda: self.settle_now(outcome))
            self.settled_now = True  # confirmed (or written again) when the batch ends
            return True
        return self.settle_now(outcome)

    def settle_now(self, outcome: Outcome) -> bool:
        """:meth:`settle`, waiting for the reply."""
        for pause_s in (*SETTLE_RETRY_DELAYS_S, None):
            try:
                self.settled_now = self.rt.ledger.settle(
                    self.task_id, self.key, outcome, only_if_running=self.only_if_running)
                return self.settled_now
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                if pause_s is None:
                    raise
                log.warning("settling task %s try %s failed; retrying in %.2fs",
                            self.task_id, self.key, pause_s, extra={"task_id": self.task_id})
                time.sleep(pause_s)
        raise AssertionError("unreachable")

    def as_try(self) -> Try:
        """What the ledger needs to begin this try."""
        return Try((self.task_id, self.key, self.token), self.attempt, self.tier,
                       self.rt.settings.tier(self.tier), self.budget_charged)

    def next_spec(self, *, attempt: int, deferrals: int, priority: int | None,
                  first_failed_at: str | None) -> TaskSpec:
        """The message of this task's next try (a retry or a deferral)."""
        spec = self.rt.publisher.spec(
            self.event, handler=self.handler, tier=self.tier, task_id=self.task_id,
            attempt=attempt, first_failed_at=first_failed_at, priority=priority,
            accepted_at=self.accepted_at)
        spec.kwargs["lineage"] = self.lineage  # retries and deferrals continue this lineage
        extra = {"deferrals": deferrals, "lost": self.lost}
        spec.kwargs.update({k: v for k, v in extra.items() if v})
        return spec

    def requeue_priority(self) -> int | None:
        """The message priority of this event's retry or deferral: one step behind
        fresh events of its priority when the tier's ``retries_yield`` (Redis,
        where kombu serves priority 0 first; on RabbitMQ the event's own)."""
        own = self.event.get("priority")
        if not (self.rt.settings.broker_is_redis
                and self.rt.settings.tier(self.tier).retries_yield):
            return own if isinstance(own, int) else None
        return min(int(own or 0) + 1, MAX_PRIORITY)

    def schedule(self, spec: TaskSpec, due_at: float) -> bool:
        spec.enqueued_at = due_at  # its queue wait starts when it is due
        key, member = self.rt.schedule.entry(spec)
        return self.settle(Outcome("schedule", key, member, due_at))

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
        spec = self.next_spec(attempt=self.attempt, deferrals=self.deferrals + 1,
                              priority=self.requeue_priority(),
                              first_failed_at=self.first_failed_at)
        if why != "retry_budget":  # past the budget check: its re-run is not charged again
            spec.kwargs["budget_charged"] = True
        if self.schedule(spec, now + delay_s):
            log.info("event %s handler %s deferred %.2fs (%s)", self.event.get("id"),
                     self.handler, delay_s, why,
                     extra=attempt_fields(self, outcome="deferred", why=why))
        self.verdict = Deferred.of(why=why, attempt=self.attempt, due_at=now + delay_s, now=now)
        return self.verdict.result

    def fan_out(self, event: Event) -> str:
        """The producer knew no handler for this type; this worker may know some."""
        handlers = registry.for_type(event.type)
        if not handlers:
            return self.dead_letter(Reason.NO_HANDLER, "LookupError",
                                    f"no handler registered for event type {event.type!r}", "")
        self.rt.publisher.enqueue(event, self.tier, handlers)  # deterministic task ids
        self.settle(Outcome("none"))
        return "fanned_out"

    def longest_run_s(self) -> float:
        """How long a delivery of this try can run before its hard time limit kills it
        (a batch's limit grows with its size), plus a margin."""
        tier = self.rt.settings.tier(self.tier)
        return tier.time_limit_s * max(1, tier.batch_size // 10) + RECHECK_MARGIN_S

    def recheck(self, delay_s: float) -> str:
        """Another delivery of this try began and may still be running (a message
        restored after a connection loss while its task ran on): look again once it
        has finished or been killed by its hard time limit. The try stays unsettled."""
        spec = self.next_spec(attempt=self.attempt, deferrals=self.deferrals,
                              priority=self.event.get("priority"),
                              first_failed_at=self.first_failed_at)
        if self.budget_charged:
            spec.kwargs["budget_charged"] = True
        now = time.time()
        due_at = now + delay_s
        spec.enqueued_at = due_at
        key, member = self.rt.schedule.entry(spec)
        self.settle(Outcome("recheck", key, member, due_at))
        log.info("event %s handler %s: try %s is running elsewhere; checking again in %.1fs",
                 self.event.get("id"), self.handler, self.key, delay_s,
                 extra=attempt_fields(self, outcome="rechecked"))
        self.verdict = Deferred.of(why=f"try {self.key} may still be running elsewhere",
                                   attempt=self.attempt, due_at=due_at, now=now,
                                   result="rechecked")
        return self.verdict.result

    def was_lost(self, previous: str) -> str:
        """An earlier delivery of this try began and never settled: a failed attempt."""
        parts = previous.split()
        where = (f" on {parts[1]} (pid {parts[2]}) at "
                 f"{datetime.fromtimestamp(float(parts[3]), UTC):%H:%M:%S} UTC"
                 if len(parts) >= 4 and parts[3].replace(".", "", 1).isdigit() else "")
        self.lost += 1
        message = (f"attempt {self.attempt} began{where} and never finished: its worker "
                   f"process was lost (crash, OOM, SIGKILL or a hard time limit); "
                   f"{self.lost} tries lost so far")
        if self.lost >= self.rt.settings.tier(self.tier).max_deliveries:
            return self.dead_letter(Reason.MAX_DELIVERIES, "WorkerLost", message, "")
        return self.failed(WorkerLostError(message))

    def failed(self, exc: BaseException) -> str:
        tier = self.rt.settings.tier(self.tier)
        decision = decide(exc, attempt=self.attempt, tier=tier)
        if not decision.retry:
            assert decision.reason is not None
            return self.dead_letter_exc(decision.reason, exc)
        spec = self.next_spec(attempt=self.attempt + 1, deferrals=0,
                              priority=self.requeue_priority(),
                              first_failed_at=self.first_failed_at or _now_iso())
        now = time.time()
        if self.schedule(spec, now + decision.delay_s):
            log.warning("event %s handler %s attempt %d failed (%s: %s); retry in %.2fs",
                        self.event.get("id"), self.handler, self.attempt, type(exc).__name__,
                        self.masked(str(exc)), decision.delay_s,
                        extra=attempt_fields(self, outcome="retried",
                                             exception=_qualname(type(exc)),
                                             delay_s=round(decision.delay_s, 3)))
        self.verdict = RetryScheduled.of(
            attempt=self.attempt, max_attempts=tier.max_retries + 1,
            exception=_qualname(type(exc)), message=self.masked(str(exc)),
            due_at=now + decision.delay_s, now=now)
        self.verdict.__cause__ = masked_cause(exc, self.masked)  # its traceback: the task's
        return self.verdict.result

    def dead_letter_exc(self, reason: Reason, exc: BaseException) -> str:
        trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        return self.dead_letter(reason, _qualname(type(exc)), str(exc), trace, cause=exc)

    def dead_letter(self, reason: Reason, exception: str, message: str, trace: str,
                    cause: BaseException | None = None) -> str:
        now = _now_iso()
        record = DeadLetterRecord(
            id=record_id(self.task_id, self.attempt, reason), event=self.event, tier=self.tier,
            handler=self.handler, reason=reason, attempts=self.attempt, exception=exception,
            message=message, traceback=trace, first_failed_at=self.first_failed_at or now,
            last_failed_at=now, worker=socket.gethostname(), task_id=self.task_id,
            queue=self.queue,
        )
        dlq = self.rt.dlq
        if dlq.on_redis:  # the record goes onto the DLQ list in the settle step itself
            key, raw = dlq.render(record)
            written = self.settle(Outcome("push", key, raw, index=dlq.index_args(record, raw)))
            if written:
                dlq.after_put()
        else:  # RabbitMQ: published with confirms first (same record id if repeated)
            dlq.put(record)
            written = self.settle(Outcome("none"))
        if written:
            log.error("event %s handler %s dead-lettered: %s (%s: %s)", self.event.get("id"),
                      self.handler or "-", reason.value, exception, self.masked(message),
                      extra=attempt_fields(self, outcome="dead_lettered", reason=reason.value,
                                           exception=exception))
        self.verdict = DeadLettered.of(reason=reason.value, attempt=self.attempt,
                                       exception=exception, message=self.masked(message),
                                       record_id=record.id)
        self.verdict.__cause__ = masked_cause(cause, self.masked)
        return self.verdict.result


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _qualname(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
