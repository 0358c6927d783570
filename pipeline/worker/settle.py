"""How a try settles: exactly one outcome, written atomically with its settled mark.

:class:`Settling` adds to a :class:`~pipeline.worker.trystate.TryState` the outcomes
of a try, each written by one settle (:meth:`pipeline.worker.ledger.Ledger.settle`,
retried: the step is idempotent) together with the try's settled mark:

* the done mark (success; a batch's goes out on its stream, the next try started in
  the same call);
* a **deferral** (the same attempt again later, past ``max_defer_age_s`` a dead
  letter), a **retry** (the next attempt after the backoff) or a **recheck** (another
  delivery may still run this try), each as the next try's message in the schedule;
* a **dead letter**: on Redis the DLQ record is pushed in the settle step itself; on
  RabbitMQ it is published with confirms first (same record id if repeated).

Each leaves in :attr:`TryState.verdict` what the task raises afterwards to give
Celery's task state the same outcome (:mod:`pipeline.worker.taskstate`) and returns
the outcome as a string (what the metrics label).
"""

from __future__ import annotations

import logging
import time

import redis

from pipeline.core.logs import attempt_fields
from pipeline.core.retry import Reason, decide, qualname
from pipeline.core.state import resend
from pipeline.messages.task import TaskSpec
from pipeline.worker.deadletter import dead_letter_record, format_trace, now_iso
from pipeline.worker.ledger import Outcome
from pipeline.worker.taskstate import DeadLettered, Deferred, RetryScheduled, masked_cause
from pipeline.worker.trystate import TryState

__all__ = ["SETTLE_RETRY_DELAYS_S", "Settling"]

# these lines keep the logger they had before they moved out of attempt.py (the JSON
# "logger" field: log queries and alerts may select on it)
log = logging.getLogger("pipeline.worker.attempt")

SETTLE_RETRY_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # pauses between settle tries


class Settling(TryState):
    """A try and the outcomes it can settle with."""

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
        """:meth:`settle`, waiting for the reply; the breakers' :attr:`records` go in
        the same script, and a breaker it closed releases the work it held."""
        records = [self.rt.breakers.record_call(downstream, ok,
                                                token=self.breaker_token(downstream))
                   for downstream, ok in self.records]

        def retrying(_: BaseException, pause_s: float) -> None:
            log.warning("settling task %s try %s failed; retrying in %.2fs",
                        self.task_id, self.key, pause_s, extra={"task_id": self.task_id})

        self.settled_now, states = resend(
            lambda: self.rt.ledger.settle_recorded(
                self.task_id, self.key, outcome, only_if_running=self.only_if_running,
                budget=self.as_try(), records=records),
            SETTLE_RETRY_DELAYS_S, retrying)
        recorded, self.records = self.records, []  # raised: the caller gives the leases back
        for (downstream, ok), state in zip(recorded, states, strict=True):
            if state == "recovered" or (ok and not self.settled_now
                                        and self._closed(downstream)):
                self.release_held(downstream)
        return self.settled_now

    def _closed(self, downstream: str) -> bool:
        """After a successful call whose settle found the try settled already: its
        first send ran and its reply was lost (redis-py re-sent it), so a close that
        send made went unreported. A closed breaker releases its held work now."""
        try:
            return self.rt.breakers.closed(downstream)
        except redis.RedisError:
            return False  # held work then runs when due

    def release_held(self, downstream: str) -> None:
        """``downstream``'s breaker has just closed: the work it deferred is due now."""
        try:
            released = self.rt.schedule.release(downstream)
        except redis.RedisError:
            log.warning("breaker %s closed; its deferred work runs when due (release "
                        "failed)", downstream, exc_info=True)
            return
        log.info("breaker %s closed: %d deferred tasks are due now", downstream, released,
                 extra={"downstream": downstream})

    def schedule(self, spec: TaskSpec, due_at: float, *, held_by: str | None = None) -> bool:
        spec.enqueued_at = due_at  # its queue wait starts when it is due
        key, member = self.rt.schedule.entry(spec)
        settled = self.settle(Outcome("schedule", key, member, due_at))
        if settled and held_by is not None:
            try:  # a hint for the breaker's recovery: without it the entry is due as set
                self.rt.schedule.hold(held_by, self.task_id, (key, member),
                                      self.accepted_at or time.time())
            except redis.RedisError as exc:
                log.warning("could not note task %s as held by breaker %s (%s); it runs "
                            "when due", self.task_id, held_by, exc)
        return settled

    def defer(self, delay_s: float, why: str, *, held_by: str | None = None) -> str:
        """Run this same attempt again later: no attempt is consumed. Past the tier's
        ``max_defer_age_s`` (counted from acceptance) the work is dead-lettered.
        ``held_by``: the downstream whose open breaker defers it; its recovery makes
        the work due at once."""
        tier = self.rt.settings.tier(self.tier)
        now = time.time()
        age_s = now - (self.accepted_at or now)
        if age_s + delay_s > tier.max_defer_age_s:
            return self.dead_letter(
                Reason.EXPIRED, "Deferred",
                f"deferred ({why}) for {age_s:.0f}s, past the tier's max_defer_age_s "
                f"of {tier.max_defer_age_s:g}s", "")
        spec = self.next_spec(attempt=self.attempt, deferrals=self.deferrals + 1,
                              priority=self.requeue_priority(deferral=True),
                              first_failed_at=self.first_failed_at)
        if why != "retry_budget":  # past the budget check: its re-run is not charged again
            spec.kwargs["budget_charged"] = True
        if self.schedule(spec, now + delay_s, held_by=held_by):
            log.info("event %s handler %s deferred %.2fs (%s)", self.event.get("id"),
                     self.handler, delay_s, why,
                     extra=attempt_fields(self, outcome="deferred", why=why))
        self.verdict = Deferred.of(why=why, attempt=self.attempt, due_at=now + delay_s, now=now)
        return self.verdict.result

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

    def failed(self, exc: BaseException) -> str:
        tier = self.rt.settings.tier(self.tier)
        decision = decide(exc, attempt=self.attempt, tier=tier)
        if not decision.retry:
            assert decision.reason is not None
            return self.dead_letter_exc(decision.reason, exc)
        spec = self.next_spec(attempt=self.attempt + 1, deferrals=0,
                              priority=self.requeue_priority(),
                              first_failed_at=self.first_failed_at or now_iso())
        now = time.time()
        if self.schedule(spec, now + decision.delay_s):
            log.warning("event %s handler %s attempt %d failed (%s: %s); retry in %.2fs",
                        self.event.get("id"), self.handler, self.attempt, type(exc).__name__,
                        self.masked(str(exc)), decision.delay_s,
                        extra=attempt_fields(self, outcome="retried",
                                             exception=qualname(type(exc)),
                                             delay_s=round(decision.delay_s, 3)))
        self.verdict = RetryScheduled.of(
            attempt=self.attempt, max_attempts=tier.max_retries + 1,
            exception=qualname(type(exc)), message=self.masked(str(exc)),
            due_at=now + decision.delay_s, now=now)
        self.verdict.__cause__ = masked_cause(exc, self.masked)  # its traceback: the task's
        return self.verdict.result

    def dead_letter_exc(self, reason: Reason, exc: BaseException) -> str:
        trace = format_trace(exc)
        return self.dead_letter(reason, qualname(type(exc)), str(exc), trace, cause=exc)

    def dead_letter(self, reason: Reason, exception: str, message: str, trace: str,
                    cause: BaseException | None = None) -> str:
        record = dead_letter_record(self, reason, exception, message, trace)
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
