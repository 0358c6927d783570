"""Per-try bookkeeping around a handler run: one atomic step before, one after.

A *try* is one run of one attempt of a task: ``(task id, try key)``, the try key
naming the replay lineage, the attempt and how often that attempt was deferred
(:func:`try_key`). Every delivery of a message carries exactly one try.

**Begin** (one Lua script, before the handler runs) returns a verdict:

* ``done``: the task's handler already succeeded (its ``done`` mark): do not run it;
* ``settled``: this try already settled (a redelivery after the outcome was written
  but before the ack): acknowledge, do not run;
* ``lost``: an earlier delivery of this try began and never settled (its process
  was killed: crash, OOM, SIGKILL, a hard time limit whose settle failed). The try
  is settled as a failed attempt without running the handler again, so **each try
  runs at most once**;
* ``over_budget``: a retry beyond the tier's **retry budget** (as Envoy's and
  Finagle's: retries admitted in a sliding window stay under ``retry_budget_ratio``
  x first attempts in it, and at least ``retry_budget_min``). It is deferred, never
  dropped, never counted as an attempt; the refusal is counted. A retry the budget
  admitted before (``charged``) is not checked again; a deferred first attempt
  counts as a first attempt again when it re-runs;
* ``run``: marks the try as running under this delivery's token and runs it. A
  begin re-sent with the same token (a reply lost to a connection reset and retried
  by the client) is the same delivery, not a lost one.

A batch begins all its tries in one round trip (:meth:`Ledger.begin_many`) with
*pending* marks (``~<token> ...``: claimed, not started); each is started (the start
script) just before its handler. A pending claim left by a lost delivery is taken
over (:meth:`Ledger.take_over`) and run without counting a lost attempt: it never ran.

**Settle** (one Lua script, after) writes the try's outcome — the done mark, a
retry or deferral into the schedule, or a DLQ record onto the DLQ list — marks the
try settled and clears its running mark, atomically; a second settle of the same
try writes nothing (idempotent: retried settles and racing redeliveries are safe).
Only after it returns does Celery acknowledge the message.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from pipeline.core.state import Keys
from pipeline.core.tiers import TierConfig
from pipeline.worker.breaker import ScriptCall
from pipeline.worker.ledgerscripts import (
    BEGIN_ARGS,
    BEGIN_GATED_LUA,
    BEGIN_LUA,
    SETTLE_LUA,
    SETTLE_RECORDED_LUA,
    START_LUA,
    TAKE_OVER_LUA,
)

__all__ = ["BEGIN_LUA", "DONE", "SETTLE_LUA", "START_LUA", "Begin", "Ledger", "Outcome", "Try",
           "budget_bucket", "try_key", "verdict"]

RUNNING_TTL_S = 7 * 24 * 3600  # a running mark outlives any redelivery delay
SETTLED_TTL_S = 24 * 3600  # a settled try's mark outlives any redelivery of its message
BUDGET_BUCKETS = 10  # a retry budget's window is counted in this many time buckets

Verdict = Literal["run", "done", "settled", "lost", "over_budget"]


def try_key(attempt: int, deferrals: int = 0, lineage: str = "") -> str:
    """``[<lineage>/]<attempt>.<deferrals>``: one try of a task (lineage: a DLQ replay)."""
    return f"{lineage}/{attempt}.{deferrals}" if lineage else f"{attempt}.{deferrals}"


@dataclass(frozen=True)
class Begin:
    verdict: Verdict
    previous: str = ""  # lost: the running mark "<token> <host> <pid> <epoch s>" left behind
    age_s: float = 0.0  # lost: how long ago that delivery began
    gated: bool = False  # run: the handler's breakers were asked in the same script
    denied_by: int = 0  # gated run: the first downstream (1-based) whose breaker denied
    retry_in_s: float = 0.0  # denied: how long until that breaker may allow a call

    @property
    def pending(self) -> bool:
        """Lost while only claimed by a batch ("~..."): that delivery never started it."""
        return self.previous.startswith("~")

    @property
    def previous_process(self) -> tuple[str, int]:
        """``(host, pid)`` of the delivery that left the running mark."""
        parts = self.previous.split()
        return (parts[1], int(parts[2])) if len(parts) >= 4 and parts[2].isdigit() else ("", 0)


@dataclass(frozen=True)
class Outcome:
    """What a settle writes: ``done``; ``schedule`` (``value`` into the zset ``target``
    at ``score``); ``push`` (``value`` onto the list ``target``); ``none``."""

    kind: Literal["done", "schedule", "push", "none", "recheck"]
    target: str = ""
    value: bytes | str = b""
    score: float = 0.0
    index: tuple[str, str, str] = ("", "", "")  # push: the DLQ index entry (dlqindex)


DONE = Outcome("done")  # the outcome of every success, built once


class Ledger:
    def __init__(self, client: redis.Redis, window_s: int) -> None:
        self._client = client
        self._window_s = window_s
        self.begin_script = client.register_script(BEGIN_LUA)
        self._take_over = client.register_script(TAKE_OVER_LUA)
        self.start_script = client.register_script(START_LUA)
        self.settle_script = client.register_script(SETTLE_LUA)
        self._begin_gated = client.register_script(BEGIN_GATED_LUA)
        self._settle_recorded = client.register_script(SETTLE_RECORDED_LUA)
        self._host = socket.gethostname()

    @property
    def client(self) -> redis.Redis:
        return self._client

    @property
    def done_ttl_s(self) -> int:
        """How long a done mark lasts (the idempotency window; 0: no marks)."""
        return self._window_s

    def done_key(self, task_id: str) -> str:
        """``task_id``'s done mark (one shared, never written, when marks are off)."""
        return Keys.done(task_id) if self._window_s > 0 else Keys.done("-disabled-")

    def begin_call(self, t: Try, *, pending: bool = False) -> tuple[list[str], list[Any]]:
        """Keys and args of the begin script (:meth:`begin`)."""
        task_id, key, token = t.ids
        budget_on = t.tier.retry_budget_ratio > 0 and not (t.charged and t.attempt > 1)
        return ([self.done_key(task_id), Keys.settled(task_id, key),
                 Keys.running(task_id, key), Keys.retry_budget(t.tier_name)],
                [time.time(), t.attempt, int(budget_on), t.tier.retry_budget_ratio,
                 t.tier.retry_budget_min, t.tier.retry_budget_window_s, BUDGET_BUCKETS,
                 RUNNING_TTL_S, token, f"{self._host} {os.getpid()}", int(pending)])

    def begin(self, t: Try, gates: list[ScriptCall] | None = None) -> Begin:
        """The verdict for one delivery of a try (``t.ids``' token names the delivery);
        with ``gates`` (the breakers' allow calls, :meth:`Breakers.allow_call`) a
        ``run`` also says whether each of them let the call through."""
        keys, args = self.begin_call(t)
        if gates is None:
            return verdict(self.begin_script(keys=keys, args=args))
        for gate_keys, gate_args in gates:
            keys, args = [*keys, *gate_keys], [*args, *gate_args]
        assert len(args) == BEGIN_ARGS + 5 * len(gates)
        return verdict(self._begin_gated(keys=keys, args=args))

    def begin_many(self, tries: list[Try]) -> list[Begin]:
        """The verdicts of a batch's tries in one round trip (pipelined); those to
        run are marked *pending* (claimed, not started: :meth:`start_call`)."""
        pipe = self._client.pipeline(transaction=False)
        for t in tries:
            keys, args = self.begin_call(t, pending=True)
            self.begin_script(keys=keys, args=args, client=pipe)
        return [verdict(reply) for reply in pipe.execute()]

    def take_over(self, t: Try, expected: str) -> Begin:
        """Begin a try that a lost batch had claimed but never started (its pending
        mark ``expected``): not a lost attempt, it never ran."""
        keys, args = self.begin_call(t)
        return verdict(self._take_over(keys=keys, args=[*args, expected]))

    def start_call(self, t: Try) -> tuple[list[str], list[Any]]:
        """Keys and args of the start script for a pending try of a batch."""
        task_id, key, token = t.ids
        return [Keys.running(task_id, key)], [token, RUNNING_TTL_S]

    def settle_call(self, task_id: str, key: str, outcome: Outcome,
                    only_if_running: bool = False,
                    budget: Try | None = None) -> tuple[list[str], list[Any]]:
        """Keys and args of the settle script (:meth:`settle`)."""
        settled = Keys.settled(task_id, key)
        keys = [settled, Keys.running(task_id, key), self.done_key(task_id),
                outcome.target or settled]
        args = [outcome.kind, SETTLED_TTL_S, self._window_s, int(only_if_running),
                outcome.value, outcome.score, *outcome.index]
        if outcome.kind == "done" and budget is not None and budget.refunds:
            keys.append(budget_bucket(budget.tier_name, budget.tier, time.time()))
            args.append(math.ceil(budget.tier.retry_budget_window_s * 2))
        return keys, args

    def settle(self, task_id: str, key: str, outcome: Outcome, *,
               only_if_running: bool = False, budget: Try | None = None) -> bool:
        """Write ``outcome`` and mark the try settled; False if it had settled already
        (or, ``only_if_running``, had not started). A retry's success (``budget``: its
        try) gives its retry-budget charge back."""
        return self.settle_recorded(task_id, key, outcome, only_if_running=only_if_running,
                                    budget=budget)[0]

    def settle_recorded(self, task_id: str, key: str, outcome: Outcome, *,
                        only_if_running: bool = False, budget: Try | None = None,
                        records: Sequence[ScriptCall] = ()) -> tuple[bool, list[str]]:
        """:meth:`settle`, and in the same script the breakers' record calls
        (:meth:`Breakers.record_call`), counted only if this settle wrote; returns
        whether it wrote and each breaker's state after it (``recovered``: this
        outcome closed it)."""
        keys, args = self.settle_call(task_id, key, outcome, only_if_running, budget)
        if not records:
            return bool(self.settle_script(keys=keys, args=args)), []
        head = [len(keys), len(args)]
        for record_keys, record_args in records:
            keys, args = [*keys, *record_keys], [*args, *record_args]
        written, *states = self._settle_recorded(keys=keys, args=[*head, *args])
        return bool(written), [s.decode() if isinstance(s, bytes) else str(s) for s in states]

    def budget_exhausted_total(self, tier_name: str) -> int:
        return int(self._client.get(Keys.retry_budget(tier_name) + "exhausted") or 0)


@dataclass(frozen=True)
class Try:
    """What :meth:`Ledger.begin` needs of a try."""

    ids: tuple[str, str, str]  # task id, try key, delivery token
    attempt: int
    tier_name: str
    tier: TierConfig
    charged: bool

    @property
    def refunds(self) -> bool:
        """Whether this try's success gives a retry-budget charge back (a retry)."""
        return self.attempt > 1 and self.tier.retry_budget_ratio > 0


def budget_bucket(tier_name: str, tier: TierConfig, now: float) -> str:
    """The retry budget's bucket of ``tier_name`` that counts at ``now`` (the begin
    script derives the same names)."""
    return Keys.retry_budget(tier_name) + str(
        math.floor(now / (tier.retry_budget_window_s / BUDGET_BUCKETS)))


def verdict(reply: list[Any]) -> Begin:
    parts = [p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in reply]
    age_s = float(parts[2]) if len(parts) > 2 else 0.0
    if len(parts) > 3:  # a gated run: the breakers' answer
        return Begin("run", gated=True, denied_by=int(parts[3]),
                     retry_in_s=float(parts[5]) if len(parts) > 5 else 0.0)
    return Begin(parts[0], parts[1] if len(parts) > 1 else "", age_s)  # type: ignore[arg-type]
