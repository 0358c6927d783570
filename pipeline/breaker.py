"""Circuit breakers per downstream, shared by every worker through Redis.

A handler declares the downstreams it depends on (``@handler(...,
downstreams=["rewards-api"])``). Before it runs, each breaker is asked; after
it returns or raises, the outcome is recorded. States:

* ``closed``: calls flow; failures are counted in a sliding window (buckets of
  ``window_s / 10``). It opens after ``consecutive_failures`` in a row, or when
  at least ``min_calls`` calls in the window failed at ``failure_ratio`` or more.
* ``open``: for ``open_s`` no call is made: the task is *deferred* to the retry
  schedule without consuming an attempt, so an outage burns neither retries nor
  DLQ records.
* ``half_open``: after the cool-down up to ``half_open_probes`` calls go through;
  a success closes the breaker with an empty window (the failures that opened it
  would otherwise reopen it on the next ordinary failure), a failure opens it again.

``pipeline breaker open|close NAME`` forces a state until the next ``close``.
State lives in the pipeline's Redis (the broker itself with a Redis broker; the
``state_url`` Redis on RabbitMQ deployments). Each transition is one Lua script.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from pipeline.state import Keys

__all__ = ["BreakerConfig", "BreakerStatus", "Breakers"]

WINDOW_BUCKETS = 10  # a breaker's window is counted in this many time buckets


class BreakerConfig(BaseModel):
    """``[breakers.NAME]``: when a downstream's breaker opens and for how long."""

    model_config = ConfigDict(extra="forbid")

    #: open when at least `min_calls` calls in the window failed at this ratio or more.
    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: calls in the window before the ratio applies.
    min_calls: Annotated[int, Field(ge=1)] = 20
    #: open after this many failures in a row, whatever the window says.
    consecutive_failures: Annotated[int, Field(ge=1)] = 10
    #: sliding window the ratio is computed over.
    window_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: cool-down: how long an open breaker stays open before it lets probes through.
    open_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    #: calls let through while half-open.
    half_open_probes: Annotated[int, Field(ge=1, le=1000)] = 2


@dataclass(frozen=True)
class BreakerStatus:
    name: str
    state: str  # closed | open | half_open | forced_open | forced_closed
    retry_in_s: float  # when denied: how long until a call may be allowed


_ALLOW_LUA = """
local key, now, open_s, probes = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local forced = redis.call('HGET', key, 'forced')
if forced == 'open' then return {0, 'forced_open', tostring(open_s)} end
if forced == 'closed' then return {1, 'forced_closed', '0'} end
local st = redis.call('HGET', key, 'state') or 'closed'
if st == 'open' then
  local since = now - tonumber(redis.call('HGET', key, 'opened_at') or now)
  if since < open_s then return {0, 'open', tostring(open_s - since)} end
  redis.call('HSET', key, 'state', 'half_open', 'probes', 0)
  st = 'half_open'
end
if st == 'half_open' then
  if redis.call('HINCRBY', key, 'probes', 1) > probes then
    redis.call('HINCRBY', key, 'probes', -1)
    return {0, 'half_open', '1'}
  end
end
return {1, st, '0'}
"""

# ARGV: now, ok (1/0), window_s, min_calls, failure_ratio, consecutive_max, buckets
_RECORD_LUA = """
local key, now, ok = KEYS[1], tonumber(ARGV[1]), ARGV[2] == '1'
local window, min_calls, ratio = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local consecutive_max, buckets = tonumber(ARGV[6]), tonumber(ARGV[7])
local st = redis.call('HGET', key, 'state') or 'closed'
if redis.call('HGET', key, 'forced') then return st end
local width = window / buckets
local b = math.floor(now / width)
if st == 'half_open' then
  if ok then
    redis.call('HSET', key, 'state', 'closed', 'consecutive', 0, 'probes', 0)
    -- a fresh window: the failures that opened it must not reopen it on the next one
    for i = 0, buckets do redis.call('DEL', key .. ':w:' .. (b - i)) end
    return 'closed'
  end
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'probes', 0)
  redis.call('HINCRBY', key, 'opened_total', 1)
  return 'open'
end
if st == 'open' then return 'open' end
local wkey = key .. ':w:' .. b
redis.call('HINCRBY', wkey, 'calls', 1)
if not ok then redis.call('HINCRBY', wkey, 'fails', 1) end
redis.call('EXPIRE', wkey, math.ceil(window * 2))
local consecutive = 0
if ok then redis.call('HSET', key, 'consecutive', 0)
else consecutive = redis.call('HINCRBY', key, 'consecutive', 1) end
if ok then return 'closed' end
local calls, fails = 0, 0
for i = 0, buckets - 1 do
  local c = redis.call('HMGET', key .. ':w:' .. (b - i), 'calls', 'fails')
  calls = calls + (tonumber(c[1]) or 0)
  fails = fails + (tonumber(c[2]) or 0)
end
if consecutive >= consecutive_max or (calls >= min_calls and fails / calls >= ratio) then
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'consecutive', 0, 'probes', 0)
  redis.call('HINCRBY', key, 'opened_total', 1)
  return 'open'
end
return 'closed'
"""


class Breakers:
    """The breakers of one deployment, in its Redis."""

    def __init__(self, client: redis.Redis, configs: dict[str, BreakerConfig]) -> None:
        self._client = client
        self._configs = configs
        self._allow = client.register_script(_ALLOW_LUA)
        self._record = client.register_script(_RECORD_LUA)

    def config(self, name: str) -> BreakerConfig:
        return self._configs.get(name) or BreakerConfig()

    def allow(self, name: str, *, now: float | None = None) -> BreakerStatus:
        """Whether a call to ``name`` may go ahead now (a half-open probe is counted)."""
        cfg = self.config(name)
        allowed, state, retry_in = self._allow(
            keys=[Keys.breaker(name)],
            args=[now or time.time(), cfg.open_s, cfg.half_open_probes])
        return BreakerStatus(name, _text(state), 0.0 if allowed else float(_text(retry_in)))

    def record(self, name: str, ok: bool, *, now: float | None = None) -> str:
        """Count one call's outcome; returns the state after it."""
        cfg = self.config(name)
        state = self._record(
            keys=[Keys.breaker(name)],
            args=[now or time.time(), int(ok), cfg.window_s, cfg.min_calls, cfg.failure_ratio,
                  cfg.consecutive_failures, WINDOW_BUCKETS])
        return _text(state)

    def force(self, name: str, state: str | None) -> None:
        """``"open"`` or ``"closed"`` until forced otherwise; ``None`` lifts it and resets."""
        key = Keys.breaker(name)
        if state is None:
            pipe = self._client.pipeline()
            pipe.hdel(key, "forced")
            pipe.hset(key, mapping={"state": "closed", "consecutive": 0, "probes": 0})
            pipe.execute()
        else:
            self._client.hset(key, "forced", state)

    def status(self, name: str) -> dict[str, Any]:
        raw: dict[bytes, bytes] = self._client.hgetall(Keys.breaker(name))  # type: ignore[assignment]
        data = {k.decode(): v.decode() for k, v in raw.items()}
        forced = data.get("forced")
        return {"name": name, "state": f"forced_{forced}" if forced else
                data.get("state", "closed"), "opened_at": data.get("opened_at"),
                "opened_total": int(data.get("opened_total", 0)),
                "consecutive_failures": int(data.get("consecutive", 0)),
                "config": self.config(name).model_dump()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
