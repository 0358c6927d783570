"""One try of one (event, handler) task: the steps every delivery goes through.

A single-event message (``pipeline.handle``) is one :class:`Attempt`; a batch
message (``pipeline.handle_batch``) is one per event, run one after the other
through the same :meth:`Attempt.run`:

1. **checks**, without I/O: the event envelope, the handler (or fan out), that the
   handler is registered for the event's type and the handler's payload model (both
   ``invalid_payload``); what fails is settled only once the begin lets it;
2. **begin** (:meth:`pipeline.worker.ledger.Ledger.begin`): already done or settled ->
   acknowledge without running; an earlier delivery of this try was lost -> settle
   it as a failed attempt (``WorkerLostError``) without running (:mod:`pipeline.worker.lost`);
   over the retry budget -> defer; in the same script, the handler's downstreams'
   circuit breakers (denied -> defer; a batch's tries ask them one by one instead);
3. **the handler**;
4. **settle** exactly one outcome, atomically with the try's settled mark and the
   breakers' record of the handler's calls: the done mark, a retry or deferral in
   the schedule, or a DLQ record (:mod:`pipeline.worker.settle`).

:meth:`Attempt.run` returns the outcome as a string (what the metrics label) and
leaves in :attr:`Attempt.verdict` what the task raises afterwards to give Celery's
task state the same outcome (:mod:`pipeline.worker.taskstate`).

Every exit after a breaker let the attempt through records or releases it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import pydantic
from billiard.exceptions import WorkerLostError

from pipeline.core.events import Event
from pipeline.core.handlers import Handler, HandlerContext, registry, running
from pipeline.core.logs import attempt_fields
from pipeline.core.retry import Reason, compute_deferral
from pipeline.errors import PermanentError, RetryAfter
from pipeline.worker.ledger import DONE, Begin, Outcome
from pipeline.worker.lost import LIVE_CLAIMS, lost_message, previous_gone
from pipeline.worker.settle import Settling

__all__ = ["Attempt"]

RECHECK_MIN_S = 1.0  # soonest look again at a try still running in this process

log = logging.getLogger(__name__)


class Attempt(Settling):
    """One delivery of one try: the event, the handler and where it stands."""

    _checked: tuple[Event, Handler] | Callable[[], str] | None = None  # by precheck()

    def run(self) -> str:
        """This delivery through begin, the checks, the handler and settle; listed in
        :data:`LIVE_CLAIMS` while it runs (a batch lists its tries' tokens itself)."""
        if self.batch is not None:
            return self._run()
        LIVE_CLAIMS.add(self.token)  # a thread or greenlet of this process runs it
        try:
            return self._run()
        finally:
            LIVE_CLAIMS.discard(self.token)

    def _run(self) -> str:
        checked = self._checked or self.check()  # no I/O: the begin's breakers depend on it
        begin = self.begin(checked[1] if isinstance(checked, tuple) else None)
        skipped = self.skip(begin)
        if skipped is not None:  # done, settled, lost or over the budget: not run now
            return skipped
        if not isinstance(checked, tuple):  # settled without running (dead letter, fan-out)
            return checked()
        event, entry = checked
        return self.invoke(event, entry, begin)

    def begin(self, entry: Handler | None = None) -> Begin:
        """This try's begin (a batch's was done for all its tries), asking ``entry``'s
        breakers in the same script; a claim pending in a batch whose delivery is gone
        is taken over."""
        if self.begun is not None:
            begin = self.begun
        else:
            gates = None if entry is None or not entry.downstreams else [
                self.rt.breakers.allow_call(d, token=self.breaker_token(d))
                for d in entry.downstreams]
            begin = self.rt.ledger.begin(self.as_try(), gates)
        if begin.verdict == "lost" and begin.pending and self.previous_gone(begin):
            begin = self.rt.ledger.take_over(self.as_try(), begin.previous)
        return begin

    def skip(self, begin: Begin) -> str | None:
        """The outcome when ``begin`` says this delivery must not run the handler now;
        None when it runs."""
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
            window_s = self.rt.settings.tier(self.tier).retry_budget_window_s
            return self.defer(compute_deferral(window_s / 10, spread_s=window_s / 2,
                                               deferrals=self.deferrals), "retry_budget")
        return None

    def precheck(self) -> None:
        """:meth:`check`, kept for :meth:`run` (a batch checks its events while Redis
        begins their tries); an error raises later, from :meth:`run`'s own check."""
        with contextlib.suppress(Exception):
            self._checked = self.check()

    def check(self) -> tuple[Event, Handler] | Callable[[], str]:
        """The event and its handler, or (when they cannot run together: the envelope
        or payload invalid, no such handler, the event to fan out) the step that settles
        the try instead, to take once the begin lets it."""
        try:
            event = Event.model_validate(self.event)
        except pydantic.ValidationError as exc:
            return functools.partial(self.dead_letter_exc, Reason.INVALID_PAYLOAD, exc)
        if not self.handler:
            return functools.partial(self.fan_out, event)
        entry = registry.get(self.handler)
        if entry is None:
            return functools.partial(self.dead_letter, Reason.NO_HANDLER, "LookupError",
                                     f"no handler named {self.handler!r} on this worker", "")
        if not entry.handles(event.type):  # a crafted DLQ record or a task applied by hand
            return functools.partial(
                self.dead_letter, Reason.INVALID_PAYLOAD, "TypeError",
                f"handler {self.handler!r} handles {entry.pattern!r}, not event type "
                f"{event.type!r}; not run", "")
        if entry.model is not None:
            try:
                entry.model.model_validate(event.payload)
            except pydantic.ValidationError as exc:
                return functools.partial(self.dead_letter_exc, Reason.INVALID_PAYLOAD, exc)
        return event, entry

    def invoke(self, event: Event, entry: Handler, begin: Begin) -> str:
        """Past the downstreams' breakers (else deferred), the handler on ``event``,
        then its outcome settled, the breakers told in the same script."""
        tier = self.rt.settings.tier(self.tier)
        ctx = HandlerContext(task_id=self.task_id, handler=self.handler, tier=self.tier,
                             attempt=self.attempt, max_attempts=tier.max_retries + 1,
                             state=self.rt.state)
        leases: list[tuple[str, str | None]] = []  # let through by a breaker asked here
        try:
            if begin.gated:  # the begin asked them
                if begin.denied_by:
                    return self.denied(entry.downstreams[begin.denied_by - 1],
                                       begin.retry_in_s)
                allowed = list(entry.downstreams)
            else:  # a batch's try, or one taken over: asked one by one
                for downstream in entry.downstreams:
                    status = self.rt.breakers.allow(downstream,
                                                    token=self.breaker_token(downstream))
                    if status.retry_in_s > 0:
                        return self.denied(downstream, status.retry_in_s)
                    leases.append((downstream, status.token))
                allowed = [downstream for downstream, _ in leases]
            if self.batch is not None and not self.started:  # a batch's claim starts
                self.started = True
                self.batch.start(self.as_try())
            try:
                with running(ctx):
                    entry(event, timeout_s=tier.soft_time_limit_s)
            except RetryAfter as exc:  # the handler asks for a delay: not a failure
                self.calls(allowed, None)
                return self.defer(exc.delay_s, "requested")
            except Exception as exc:
                self.calls(allowed, None if isinstance(exc, PermanentError) else False)
                return self.failed(exc)
            self.calls(allowed, True)
            self.settle(DONE)
            return "succeeded"
        finally:  # every exit gives back a probe slot it did not settle (no-op if it did)
            for downstream, token in leases:
                self.rt.breakers.release(downstream, token)
            for downstream, _ in self.records:  # its settle failed: no outcome counted
                self.rt.breakers.release(downstream, self.breaker_token(downstream))
            self.records = []

    def calls(self, downstreams: list[str], ok: bool | None) -> None:
        """The outcome of the handler's calls to ``downstreams`` (None: not counted):
        recorded by the settle that follows, or (a batch's done settles stream) now."""
        if self.batch is None:
            self.records = [(downstream, ok) for downstream in downstreams]
            return
        if ok is None:
            return
        for downstream in downstreams:
            self.rt.breakers.record(downstream, ok=ok, token=self.breaker_token(downstream),
                                    on_recovered=functools.partial(self.release_held,
                                                                   downstream))

    def denied(self, downstream: str, retry_in_s: float) -> str:
        """``downstream``'s breaker let no call through: the same attempt, later."""
        delay_s = compute_deferral(retry_in_s,
                                   spread_s=self.rt.breakers.config(downstream).open_s,
                                   deferrals=self.deferrals)
        return self.defer(delay_s, f"breaker_open:{downstream}", held_by=downstream)

    def previous_gone(self, begin: Begin) -> bool:
        """Whether the delivery that left ``begin``'s mark can no longer be running."""
        return previous_gone(begin, self.longest_run_s())

    def fan_out(self, event: Event) -> str:
        """The producer knew no handler for this type; this worker may know some."""
        handlers = registry.for_type(event.type)
        if not handlers:
            return self.dead_letter(Reason.NO_HANDLER, "LookupError",
                                    f"no handler registered for event type {event.type!r}", "")
        self.rt.publisher.enqueue(event, self.tier, handlers)  # deterministic task ids
        self.settle(Outcome("none"))
        return "fanned_out"

    def was_lost(self, previous: str) -> str:
        """An earlier delivery of this try began and never settled: a failed attempt."""
        message = lost_message(previous, self.attempt, self.lost + 1)
        self.lost += 1
        if self.lost >= self.rt.settings.tier(self.tier).max_deliveries:
            return self.dead_letter(Reason.MAX_DELIVERIES, "WorkerLost", message, "")
        return self.failed(WorkerLostError(message))
