"""Batched tiers: many events per Celery message, per-event semantics kept.

Celery's per-message cost (~1 ms of worker CPU here) caps one worker near
1,000 tasks/s. A tier with ``batch_size = N`` packs up to N events that share
one handler into one ``pipeline.handle_batch`` message at publish time; the
worker runs each event through the same steps as a single event
(:class:`~pipeline.worker.attempt.Attempt`: begin, breakers, payload model, rate limit,
handler, settle), one after the other. Each event keeps its own task id, done
mark, attempts and DLQ record: an event that fails is retried or dead-lettered
*alone*, as an ordinary ``pipeline.handle`` task; one that already succeeded or
settled is skipped on a redelivery. A batch whose worker dies mid-way is
redelivered: the events settled before are acknowledged, the one that was running
is settled as a lost (failed) attempt and retried alone, the rest run.

Packing is all-or-nothing per batch message: a Lua script claims the
idempotency keys of its events and pushes the message only if none was a
duplicate; otherwise it releases its claims and the publisher re-packs without
the duplicates.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
import time
import uuid
from collections import Counter
from typing import TYPE_CHECKING, Any

from celery.utils.time import rate
from kombu.utils.limits import TokenBucket

from pipeline.core.names import BATCH_TASK_NAME
from pipeline.core.pools import processes
from pipeline.messages.taskids import event_task_id
from pipeline.worker.attempt import Attempt
from pipeline.worker.batchledger import BatchLedger
from pipeline.worker.ledger import Try
from pipeline.worker.lost import LIVE_CLAIMS
from pipeline.worker.runtime import runtime_for
from pipeline.worker.task import PipelineTask, settle_or_requeue
from pipeline.worker.taskstate import BatchDeadLettered, raise_for

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.worker.runtime import Runtime

__all__ = ["BatchTask", "RateGate", "batch_outcomes", "batch_tries", "batch_verdict",
           "register_batch_task"]

BATCH_RESULT_PREFIX = "batch:"  # then "succeeded=98;retry_scheduled=2" (per-event results)
TOKEN_INDEX_HEX = 6  # hex digits of a try's index in its batch's delivery tokens
log = logging.getLogger(__name__)



def _attempts(rt: Runtime, events: list[dict[str, Any]], kwargs: dict[str, Any],
              tries: list[Try], into: list[Attempt], *, precheck: bool = True) -> None:
    """Each event's :class:`Attempt` (of its try in ``tries``) into ``into``, its pure
    checks run (:meth:`Attempt.precheck`): done while Redis begins the tries."""
    like = Attempt(rt, "", {}, kwargs)  # what they share, read from the kwargs once
    for event, t in zip(events, tries, strict=True):
        attempt = like.sibling(t.ids[0], event, t.ids[2], t)
        if precheck:
            attempt.precheck()
        into.append(attempt)


def run_batch(rt: Runtime, events: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    """Each event through :meth:`Attempt.run`, as if it had its own message; the
    per-event results counted. Every try is begun in one round trip (claimed,
    *pending*), and each one's start and successful settle go out on a
    :class:`~pipeline.worker.settlestream.SettleStream` without waiting, confirmed at
    the end. A settle that cannot reach the state store raises: the batch
    is redelivered and its settled events are acknowledged, not re-run."""
    outcomes: Counter[str] = Counter()
    gate = _rate_gate(rt, str(kwargs.get("tier", "")))
    tries = batch_tries(rt, events, kwargs)
    session = BatchLedger(rt.ledger)
    tokens = {t.ids[2] for t in tries}
    LIVE_CLAIMS.update(tokens)  # while listed, a redelivery here does not take them over
    attempts: list[Attempt] = []
    try:  # the attempts are built and checked while Redis begins their tries
        begins = session.begin_many(tries, meanwhile=functools.partial(
            _attempts, rt, events, kwargs, tries, attempts))
        if len(attempts) < len(tries):  # begun the usual way, without meanwhile
            attempts.clear()
            _attempts(rt, events, kwargs, tries, attempts, precheck=False)
        for attempt, begun in zip(attempts, begins, strict=True):
            attempt.begun, attempt.batch = begun, session
        if gate is None:  # a settle starts the next try (a rate limit may wait between)
            for attempt, after in itertools.pairwise(attempts):
                attempt.following = after
        for attempt in attempts:
            if gate is not None:
                gate.wait()
            outcomes[attempt.run()] += 1
    finally:
        LIVE_CLAIMS.difference_update(tokens)
        for what in session.close():
            log.warning("batch: the start of %s found its claim taken over (judged "
                        "lost); the event may have run twice", what)
    return BATCH_RESULT_PREFIX + ";".join(f"{k}={v}" for k, v in outcomes.items())


def batch_tries(rt: Runtime, events: list[dict[str, Any]], kwargs: dict[str, Any]) -> list[Try]:
    """Each event's try (:meth:`TryState.as_try`, its fields read once from the shared
    ``kwargs``): its own task id, and a delivery token derived from the batch's."""
    handler = str(kwargs.get("handler", ""))
    scope = rt.settings.idempotency_scope
    base = uuid.uuid4().hex[:32 - TOKEN_INDEX_HEX]  # one random part per batch delivery
    like = Attempt(rt, "", {}, kwargs, token=base).as_try()  # what the tries share
    _, key, _ = like.ids
    return [Try((event_task_id(e, handler, scope), key, f"{base}{i:0{TOKEN_INDEX_HEX}x}"),
                like.attempt, like.tier_name, like.tier, like.charged)
            for i, e in enumerate(events)]


def batch_attempts(rt: Runtime, events: list[dict[str, Any]],
                   kwargs: dict[str, Any]) -> list[Attempt]:
    """One :class:`Attempt` per event: its own task id, attempt 1 of its own lineage."""
    attempts: list[Attempt] = []
    _attempts(rt, events, kwargs, batch_tries(rt, events, kwargs), attempts, precheck=False)
    return attempts


class RateGate:
    """A token bucket that the threads (or greenlets) of one process share."""

    def __init__(self, per_s: float) -> None:
        self._bucket = TokenBucket(per_s, capacity=1)
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Return once this caller may go; sleeps (without the lock) until then."""
        while True:
            with self._lock:
                if self._bucket.can_consume(1):
                    return
                pause_s = self._bucket.expected_time(1)
            time.sleep(pause_s)


_GATES: dict[tuple[int, str], RateGate | None] = {}  # (pid, tier) -> its rate limit
_GATES_LOCK = threading.Lock()


def _rate_gate(rt: Runtime, tier: str) -> RateGate | None:
    """The tier's ``rate_limit`` shared out over the worker's processes (``concurrency``
    under prefork, one under threads and gevent), as Celery's per-worker limit is,
    applied per event of a batch."""
    key = (os.getpid(), tier)
    with _GATES_LOCK:
        if key not in _GATES:
            cfg = rt.settings.tiers.get(tier)
            per_s = rate(cfg.rate_limit) if cfg is not None and cfg.rate_limit else 0.0
            _GATES[key] = RateGate(per_s / processes(cfg.pool, cfg.concurrency)) \
                if cfg is not None and per_s else None
        return _GATES[key]


def batch_verdict(result: str) -> BatchDeadLettered | None:
    """A batch message is FAILURE when some of its events were dead-lettered in it:
    the only place Flower sees those (its retried events show as tasks of their own)."""
    pairs = batch_outcomes(result)
    dead = [(r.removeprefix("dead_lettered:"), n) for r, n in pairs
            if r.startswith("dead_lettered:")]
    if not dead:
        return None
    reasons = ", ".join(f"{reason}={n}" for reason, n in dead)
    return BatchDeadLettered(f"{sum(n for _, n in dead)} of {sum(n for _, n in pairs)} "
                             f"events dead-lettered ({reasons}); per event: "
                             f"{result.removeprefix(BATCH_RESULT_PREFIX)}", result)


def batch_outcomes(retval: str) -> list[tuple[str, int]]:
    """``[(per-event result, count)]`` from what ``pipeline.handle_batch`` returned."""
    body = retval.removeprefix(BATCH_RESULT_PREFIX)
    pairs = (part.rpartition("=") for part in body.split(";") if part)
    return [(result, int(n)) for result, _, n in pairs if n.isdigit()]


class BatchTask(PipelineTask):
    """``pipeline.handle_batch``: a hard time limit settles the event that was running."""

    def attempts(self, task_id: str, args: Any, kwargs: Any) -> list[Attempt]:
        return batch_attempts(runtime_for(self.app), list(args[0]), dict(kwargs))


def register_batch_task(app: Celery) -> Any:
    @app.task(name=BATCH_TASK_NAME, bind=True, base=BatchTask, shared=False)
    def handle_batch(self: BatchTask, /, events: list[dict[str, Any]], **kwargs: Any) -> str:
        result = settle_or_requeue(str(self.request.id),
                                   lambda: run_batch(runtime_for(self.app), events, kwargs),
                                   self.app)
        verdict = batch_verdict(result)
        if verdict is not None:
            raise_for(verdict)
        return result

    return handle_batch
