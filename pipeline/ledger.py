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

**Settle** (one Lua script, after) writes the try's outcome — the done mark, a
retry or deferral into the schedule, or a DLQ record onto the DLQ list — marks the
try settled and clears its running mark, atomically; a second settle of the same
try writes nothing (idempotent: retried settles and racing redeliveries are safe).
Only after it returns does Celery acknowledge the message.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from pipeline.dlqscripts import INDEX_LUA
from pipeline.state import Keys
from pipeline.tiers import TierConfig

__all__ = ["Begin", "Ledger", "NextTry", "Outcome", "try_key"]

RUNNING_TTL_S = 7 * 24 * 3600  # a running mark outlives any redelivery delay
SETTLED_TTL_S = 24 * 3600  # a settled try's mark outlives any redelivery of its message
BUDGET_BUCKETS = 10  # a retry budget's window is counted in this many time buckets

Verdict = Literal["run", "done", "settled", "lost", "over_budget"]

# KEYS: done mark, settled mark, running mark, budget key prefix
# ARGV: now, attempt, budget on (1/0), ratio, min per window, window_s, buckets, ttl_s,
#       token, "<host> <pid>". The running mark is "<token> <host> <pid> <server time>";
#       'lost' returns it with its age in seconds by the server's clock.
_BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'settled'} end
local t = redis.call('TIME')
local server_now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cur = redis.call('GET', KEYS[3])
if cur then
  if string.sub(cur, 1, #ARGV[9] + 1) == ARGV[9] .. ' ' then return {'run'} end
  local began = tonumber(string.match(cur, '(%S+)$')) or 0
  return {'lost', cur, tostring(server_now - began)}
end
if ARGV[3] == '1' then
  local now, attempt = tonumber(ARGV[1]), tonumber(ARGV[2])
  local window, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
  local b = math.floor(now / (window / buckets))
  local bkey = KEYS[4] .. b
  if attempt == 1 then
    redis.call('HINCRBY', bkey, 'first', 1)
  else
    local first, retried = 0, 0
    for i = 0, buckets - 1 do
      local c = redis.call('HMGET', KEYS[4] .. (b - i), 'first', 'retry')
      first = first + (tonumber(c[1]) or 0)
      retried = retried + (tonumber(c[2]) or 0)
    end
    if retried >= math.max(tonumber(ARGV[5]), tonumber(ARGV[4]) * first) then
      redis.call('INCR', KEYS[4] .. 'exhausted')
      return {'over_budget'}
    end
    redis.call('HINCRBY', bkey, 'retry', 1)
  end
  redis.call('EXPIRE', bkey, math.ceil(window * 2))
end
redis.call('SET', KEYS[3], ARGV[9] .. ' ' .. ARGV[10] .. ' ' .. string.format('%.3f', server_now),
           'EX', tonumber(ARGV[8]))
return {'run'}
"""

# KEYS: settled mark, running mark, done mark, target (schedule zset or DLQ list)
# ARGV: kind (done|schedule|push|none; recheck: schedule, leave the try unsettled),
#       settled ttl_s, done ttl_s, only if running (1/0), member or message, score,
#       push: DLQ index prefix ('' = none), index meta, group message
_SETTLE_LUA = INDEX_LUA + """
local kind, done_ttl = ARGV[1], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if kind == 'done' and done_ttl > 0 then redis.call('SET', KEYS[3], '1', 'EX', done_ttl) end
  return 0
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if kind == 'recheck' then
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[5])
  return 1
end
if kind == 'done' then
  if done_ttl > 0 then redis.call('SET', KEYS[3], '1', 'EX', done_ttl) end
elseif kind == 'schedule' then
  redis.call('ZADD', KEYS[4], tonumber(ARGV[6]), ARGV[5])
elseif kind == 'push' then
  redis.call('LPUSH', KEYS[4], ARGV[5])
  if ARGV[7] ~= '' then ix_add(ARGV[7], ARGV[8], ARGV[9]) end
end
if kind ~= 'done' or done_ttl == 0 then
  redis.call('SET', KEYS[1], kind, 'EX', tonumber(ARGV[2]))
end
redis.call('DEL', KEYS[2])
return 1
"""


# A batch's settle of one event and begin of the next, in one round trip.
# KEYS: the settle's 4, then the begin's 4. ARGV: the settle's 9, then the begin's 10.
_SETTLE_THEN_BEGIN_LUA = (
    "local function settle(KEYS, ARGV)\n" + _SETTLE_LUA + "\nend\n"
    "local function begin(KEYS, ARGV)\n" + _BEGIN_LUA + "\nend\n"
    "local settled = settle({KEYS[1], KEYS[2], KEYS[3], KEYS[4]},"
    " {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]})\n"
    "local begun = begin({KEYS[5], KEYS[6], KEYS[7], KEYS[8]},"
    " {ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15], ARGV[16], ARGV[17],"
    " ARGV[18], ARGV[19]})\n"
    "return {settled, begun}\n"
)


def try_key(attempt: int, deferrals: int = 0, lineage: str = "") -> str:
    """``[<lineage>/]<attempt>.<deferrals>``: one try of a task (lineage: a DLQ replay)."""
    return f"{lineage}/{attempt}.{deferrals}" if lineage else f"{attempt}.{deferrals}"


@dataclass(frozen=True)
class Begin:
    verdict: Verdict
    previous: str = ""  # lost: the running mark "<token> <host> <pid> <epoch s>" left behind
    age_s: float = 0.0  # lost: how long ago that delivery began

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


class Ledger:
    def __init__(self, client: redis.Redis, window_s: int) -> None:
        self._client = client
        self._window_s = window_s
        self._begin = client.register_script(_BEGIN_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._settle_then_begin = client.register_script(_SETTLE_THEN_BEGIN_LUA)
        self._host = socket.gethostname()

    def _done_key(self, task_id: str) -> str:
        return Keys.done(task_id) if self._window_s > 0 else Keys.done("-disabled-")

    def _begin_call(self, task_id: str, key: str, token: str, *, attempt: int,
                    tier_name: str, tier: TierConfig, charged: bool) -> tuple[list[str], list[Any]]:
        budget_on = tier.retry_budget_ratio > 0 and not (charged and attempt > 1)
        return ([self._done_key(task_id), Keys.settled(task_id, key),
                 Keys.running(task_id, key), Keys.retry_budget(tier_name)],
                [time.time(), attempt, int(budget_on), tier.retry_budget_ratio,
                 tier.retry_budget_min, tier.retry_budget_window_s, BUDGET_BUCKETS,
                 RUNNING_TTL_S, token, f"{self._host} {os.getpid()}"])

    def begin(self, task_id: str, key: str, token: str, *, attempt: int, tier_name: str,
              tier: TierConfig, charged: bool = False) -> Begin:
        """The verdict for one delivery of try ``key``; ``token`` names the delivery."""
        keys, args = self._begin_call(task_id, key, token, attempt=attempt,
                                      tier_name=tier_name, tier=tier, charged=charged)
        return _verdict(self._begin(keys=keys, args=args))

    def _settle_call(self, task_id: str, key: str, outcome: Outcome,
                     only_if_running: bool) -> tuple[list[str], list[Any]]:
        return ([Keys.settled(task_id, key), Keys.running(task_id, key),
                 self._done_key(task_id), outcome.target or Keys.settled(task_id, key)],
                [outcome.kind, SETTLED_TTL_S, self._window_s, int(only_if_running),
                 outcome.value, outcome.score, *outcome.index])

    def settle(self, task_id: str, key: str, outcome: Outcome, *,
               only_if_running: bool = False) -> bool:
        """Write ``outcome`` and mark the try settled; False if it had settled already
        (or, ``only_if_running``, had not begun)."""
        keys, args = self._settle_call(task_id, key, outcome, only_if_running)
        return bool(self._settle(keys=keys, args=args))

    def settle_then_begin(self, task_id: str, key: str, outcome: Outcome,
                          next_try: NextTry) -> tuple[bool, Begin]:
        """:meth:`settle` this try and :meth:`begin` the next event of a batch in one
        round trip (both steps keep their own idempotency)."""
        skeys, sargs = self._settle_call(task_id, key, outcome, False)
        bkeys, bargs = self._begin_call(*next_try.ids, attempt=next_try.attempt,
                                        tier_name=next_try.tier_name, tier=next_try.tier,
                                        charged=next_try.charged)
        settled, begun = self._settle_then_begin(keys=skeys + bkeys, args=sargs + bargs)
        return bool(settled), _verdict(begun)

    def budget_exhausted_total(self, tier_name: str) -> int:
        return int(self._client.get(Keys.retry_budget(tier_name) + "exhausted") or 0)


@dataclass(frozen=True)
class NextTry:
    """What :meth:`Ledger.begin` needs of the next event's try, for
    :meth:`Ledger.settle_then_begin`."""

    ids: tuple[str, str, str]  # task id, try key, delivery token
    attempt: int
    tier_name: str
    tier: TierConfig
    charged: bool


def _verdict(reply: list[Any]) -> Begin:
    parts = [p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in reply]
    age_s = float(parts[2]) if len(parts) > 2 else 0.0
    return Begin(parts[0], parts[1] if len(parts) > 1 else "", age_s)  # type: ignore[arg-type]
