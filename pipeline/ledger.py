"""Per-attempt bookkeeping around a handler run: one round trip before, one after.

Before the handler runs, one Lua script:

* returns at once if the task's handler already succeeded (its ``done`` mark:
  a redelivered or replayed task does not run it again);
* counts the delivery of this attempt (Redis keeps no delivery count, and a
  crashing handler cannot count itself) — past the tier's ``max_deliveries`` the
  attempt is dead-lettered as ``max_deliveries``;
* applies the tier's **retry budget** (as Envoy's and Finagle's): retries
  admitted in a sliding window stay under ``retry_budget_ratio`` x first
  attempts in it (and at least ``retry_budget_min`` per window). A retry beyond
  the budget is not run now: it is deferred, never dropped, never counted as
  an attempt, and the exhaustion is counted for metrics and alerts. A retry
  the budget already admitted (``charged``: deferred afterwards by an open
  breaker or the handler) is neither counted nor refused again when it re-runs,
  so an outage's deferrals do not eat the budget its recovery needs; a deferred
  first attempt counts as a first attempt when it re-runs, as the calls it
  makes then are what the window's retries are measured against.

After the handler succeeds, the ``done`` mark is written and the delivery count
cleared, before Celery acknowledges the message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.state import Keys
from pipeline.tiers import TierConfig

__all__ = ["Begin", "Ledger"]

DELIVERY_COUNT_TTL_S = 7 * 24 * 3600  # a delivery count outlives any redelivery delay
BUDGET_BUCKETS = 10  # a retry budget's window is counted in this many time buckets

# KEYS: done mark, delivery count, budget key prefix
# ARGV: now, attempt, budget on (1/0), ratio, min per window, window_s, buckets, ttl_s
_BEGIN_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {1, 0, 1} end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
if ARGV[3] ~= '1' or n > 1 then return {0, n, 1} end
local now, attempt = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
local b = math.floor(now / (window / buckets))
local bkey = KEYS[3] .. b
if attempt == 1 then
  redis.call('HINCRBY', bkey, 'first', 1)
  redis.call('EXPIRE', bkey, math.ceil(window * 2))
  return {0, n, 1}
end
local first, retried = 0, 0
for i = 0, buckets - 1 do
  local c = redis.call('HMGET', KEYS[3] .. (b - i), 'first', 'retry')
  first = first + (tonumber(c[1]) or 0)
  retried = retried + (tonumber(c[2]) or 0)
end
if retried < math.max(tonumber(ARGV[5]), tonumber(ARGV[4]) * first) then
  redis.call('HINCRBY', bkey, 'retry', 1)
  redis.call('EXPIRE', bkey, math.ceil(window * 2))
  return {0, n, 1}
end
redis.call('DEL', KEYS[2])
redis.call('INCR', KEYS[3] .. 'exhausted')
return {0, 0, 0}
"""


@dataclass(frozen=True)
class Begin:
    done: bool  # the handler already succeeded: do not run it
    deliveries: int  # deliveries of this attempt, this one included
    admitted: bool  # False: a retry over the tier's budget, to be deferred


class Ledger:
    def __init__(self, client: redis.Redis, window_s: int) -> None:
        self._client = client
        self._window_s = window_s
        self._begin = client.register_script(_BEGIN_LUA)

    def begin(self, task_id: str, attempt: int, tier_name: str, tier: TierConfig, *,
              charged: bool = False) -> Begin:
        """``charged``: the budget admitted this attempt before (it was deferred after).
        A charged retry is not checked or counted again; a charged first attempt is
        counted as a first attempt again when it re-runs (it is about to make its call
        now, and the retries that follow it are charged against this window)."""
        done_key = Keys.done(task_id) if self._window_s > 0 else Keys.done("-disabled-")
        budget_on = tier.retry_budget_ratio > 0 and not (charged and attempt > 1)
        done, n, admitted = self._begin(
            keys=[done_key, Keys.deliveries(task_id, attempt), Keys.retry_budget(tier_name)],
            args=[time.time(), attempt, int(budget_on), tier.retry_budget_ratio,
                  tier.retry_budget_min, tier.retry_budget_window_s, BUDGET_BUCKETS,
                  DELIVERY_COUNT_TTL_S])
        return Begin(bool(done), int(n), bool(admitted))

    def succeeded(self, task_id: str, attempt: int) -> None:
        pipe = self._client.pipeline()
        if self._window_s > 0:
            pipe.set(Keys.done(task_id), "1", ex=self._window_s)
        pipe.delete(Keys.deliveries(task_id, attempt))
        pipe.execute()

    def mark_done(self, task_id: str, pipe: Any) -> None:
        """Queue the done mark of ``task_id`` on a pipeline the caller executes."""
        if self._window_s > 0:
            pipe.set(Keys.done(task_id), "1", ex=self._window_s)

    def clear(self, task_id: str, attempt: int) -> None:
        self._client.delete(Keys.deliveries(task_id, attempt))

    def budget_exhausted_total(self, tier_name: str) -> int:
        return int(self._client.get(Keys.retry_budget(tier_name) + "exhausted") or 0)
