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

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from pipeline.core.state import Keys
from pipeline.core.tiers import TierConfig
from pipeline.dlq.scripts import INDEX_LUA

__all__ = ["BEGIN_LUA", "SETTLE_LUA", "START_LUA", "Begin", "Ledger", "Outcome", "Try", "try_key",
           "verdict"]

RUNNING_TTL_S = 7 * 24 * 3600  # a running mark outlives any redelivery delay
SETTLED_TTL_S = 24 * 3600  # a settled try's mark outlives any redelivery of its message
BUDGET_BUCKETS = 10  # a retry budget's window is counted in this many time buckets

Verdict = Literal["run", "done", "settled", "lost", "over_budget"]

# KEYS: done mark, settled mark, running mark, budget key prefix
# ARGV: now, attempt, budget on (1/0), ratio, min per window, window_s, buckets, ttl_s,
#       token, "<host> <pid>", pending (1/0). The running mark is
#       "<token> <host> <pid> <server time>", "~<token> ..." while pending (claimed by a
#       batch, not started); 'lost' returns it with its age in seconds by the server's clock.
BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'done'} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'settled'} end
local t = redis.call('TIME')
local server_now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cur = redis.call('GET', KEYS[3])
if cur then
  if string.sub(cur, 1, #ARGV[9] + 1) == ARGV[9] .. ' '
     or string.sub(cur, 1, #ARGV[9] + 2) == '~' .. ARGV[9] .. ' ' then return {'run'} end
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
local mark = ARGV[9] .. ' ' .. ARGV[10] .. ' ' .. string.format('%.3f', server_now)
if ARGV[11] == '1' then mark = '~' .. mark end
redis.call('SET', KEYS[3], mark, 'EX', tonumber(ARGV[8]))
return {'run'}
"""

# A pending try whose batch was lost before it started: clear the mark left behind
# (if still that one) and begin afresh. KEYS, ARGV: the begin's, then the expected mark.
TAKE_OVER_LUA = (
    "local function begin(KEYS, ARGV)\n" + BEGIN_LUA + "\nend\n"
    "if redis.call('GET', KEYS[3]) == ARGV[12] then redis.call('DEL', KEYS[3]) end\n"
    "return begin(KEYS, ARGV)\n"
)

# A batch starts a pending try: "~<token> ..." becomes "<token> ...". KEYS: running mark.
# ARGV: token, ttl_s. Returns 0 when the mark is not this delivery's pending one.
START_LUA = """
local cur = redis.call('GET', KEYS[1])
if not cur or string.sub(cur, 1, #ARGV[1] + 2) ~= '~' .. ARGV[1] .. ' ' then return 0 end
redis.call('SET', KEYS[1], string.sub(cur, 2), 'EX', tonumber(ARGV[2]))
return 1
"""

# KEYS: settled mark, running mark, done mark, target (schedule zset or DLQ list)
# ARGV: kind (done|schedule|push|none; recheck: schedule, leave the try unsettled),
#       settled ttl_s, done ttl_s, only if running (1/0: began and not merely pending),
#       member or message, score, push: DLQ index prefix ('' = none), index meta, group message
SETTLE_LUA = INDEX_LUA + """
local kind, done_ttl = ARGV[1], tonumber(ARGV[3])
if redis.call('EXISTS', KEYS[1]) == 1 then
  if kind == 'done' and done_ttl > 0 then redis.call('SET', KEYS[3], '1', 'EX', done_ttl) end
  return 0
end
if ARGV[4] == '1' then
  local cur = redis.call('GET', KEYS[2])
  if not cur or string.sub(cur, 1, 1) == '~' then return 0 end
end
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



def try_key(attempt: int, deferrals: int = 0, lineage: str = "") -> str:
    """``[<lineage>/]<attempt>.<deferrals>``: one try of a task (lineage: a DLQ replay)."""
    return f"{lineage}/{attempt}.{deferrals}" if lineage else f"{attempt}.{deferrals}"


@dataclass(frozen=True)
class Begin:
    verdict: Verdict
    previous: str = ""  # lost: the running mark "<token> <host> <pid> <epoch s>" left behind
    age_s: float = 0.0  # lost: how long ago that delivery began

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


class Ledger:
    def __init__(self, client: redis.Redis, window_s: int) -> None:
        self._client = client
        self._window_s = window_s
        self.begin_script = client.register_script(BEGIN_LUA)
        self._take_over = client.register_script(TAKE_OVER_LUA)
        self.start_script = client.register_script(START_LUA)
        self.settle_script = client.register_script(SETTLE_LUA)
        self._host = socket.gethostname()

    @property
    def client(self) -> redis.Redis:
        return self._client

    def _done_key(self, task_id: str) -> str:
        return Keys.done(task_id) if self._window_s > 0 else Keys.done("-disabled-")

    def begin_call(self, t: Try, *, pending: bool = False) -> tuple[list[str], list[Any]]:
        """Keys and args of the begin script (:meth:`begin`)."""
        task_id, key, token = t.ids
        budget_on = t.tier.retry_budget_ratio > 0 and not (t.charged and t.attempt > 1)
        return ([self._done_key(task_id), Keys.settled(task_id, key),
                 Keys.running(task_id, key), Keys.retry_budget(t.tier_name)],
                [time.time(), t.attempt, int(budget_on), t.tier.retry_budget_ratio,
                 t.tier.retry_budget_min, t.tier.retry_budget_window_s, BUDGET_BUCKETS,
                 RUNNING_TTL_S, token, f"{self._host} {os.getpid()}", int(pending)])

    def begin(self, t: Try) -> Begin:
        """The verdict for one delivery of a try (``t.ids``' token names the delivery)."""
        keys, args = self.begin_call(t)
        return verdict(self.begin_script(keys=keys, args=args))

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

    def running_key(self, task_id: str, key: str) -> str:
        return Keys.running(task_id, key)

    def start_call(self, t: Try) -> tuple[list[str], list[Any]]:
        """Keys and args of the start script for a pending try of a batch."""
        task_id, key, token = t.ids
        return [Keys.running(task_id, key)], [token, RUNNING_TTL_S]

    def settle_call(self, task_id: str, key: str, outcome: Outcome,
                    only_if_running: bool = False) -> tuple[list[str], list[Any]]:
        """Keys and args of the settle script (:meth:`settle`)."""
        return ([Keys.settled(task_id, key), Keys.running(task_id, key),
                 self._done_key(task_id), outcome.target or Keys.settled(task_id, key)],
                [outcome.kind, SETTLED_TTL_S, self._window_s, int(only_if_running),
                 outcome.value, outcome.score, *outcome.index])

    def settle(self, task_id: str, key: str, outcome: Outcome, *,
               only_if_running: bool = False) -> bool:
        """Write ``outcome`` and mark the try settled; False if it had settled already
        (or, ``only_if_running``, had not started)."""
        keys, args = self.settle_call(task_id, key, outcome, only_if_running)
        return bool(self.settle_script(keys=keys, args=args))

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


def verdict(reply: list[Any]) -> Begin:
    parts = [p.decode(errors="replace") if isinstance(p, bytes) else str(p) for p in reply]
    age_s = float(parts[2]) if len(parts) > 2 else 0.0
    return Begin(parts[0], parts[1] if len(parts) > 1 else "", age_s)  # type: ignore[arg-type]
