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
* ``half_open``: after the cool-down up to ``half_open_probes`` calls go through at
  once; the first success closes the breaker with an empty window (the failures that
  opened it would otherwise reopen it on the next ordinary failure). The probes are
  judged as a group: the breaker opens again only when ``half_open_probes`` of them
  failed, so one ordinary failure of a downstream that is back (one in five, say)
  does not cost another whole cool-down. A failed probe frees its slot for the next.
  The work it deferred is made due at once on the close (``on_recovered``, the retry
  schedule's ``release``) instead of waiting out its deferral.

Each probe holds a *lease*: a member of the sorted set ``<key>:probes`` scored by
its expiry. :meth:`Breakers.allow` returns its token; :meth:`Breakers.record`
settles it, :meth:`Breakers.release` gives it back without an outcome. A probe
that never does either (its process was killed, it hit its hard time limit) loses
its slot when the lease expires: the allow script reclaims expired leases before it
counts, so a breaker can no longer stay half-open with every slot leaked.

The ledger folds both steps into its own scripts (:mod:`pipeline.worker.ledgerscripts`):
a try's begin asks its handler's breakers (:meth:`Breakers.allow_call`), its settle
records the outcome (:meth:`Breakers.record_call`), so a call behind a breaker costs
no round trip of its own.

``pipeline breaker open|close NAME`` forces a state until the next ``close``.
State lives in the pipeline's Redis (the broker itself with a Redis broker; the
``state_url`` Redis on RabbitMQ deployments). Each transition is one Lua script.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.config.model import BreakerConfig
from pipeline.core.state import Keys

__all__ = ["ALLOW_LUA", "RECORD_LUA", "BreakerStatus", "Breakers", "ScriptCall"]

WINDOW_BUCKETS = 10  # a breaker's window is counted in this many time buckets
PROBE_LEASE_MARGIN_S = 30.0  # added to the longest tier time limit to derive probe_lease_s
DEFAULT_TIME_LIMIT_S = 90.0  # a tier's default time_limit_s: the lease base without tiers


ScriptCall = tuple[list[str], list[Any]]  # a script's keys and args


@dataclass(frozen=True)
class BreakerStatus:
    name: str
    state: str  # closed | open | half_open | forced_open | forced_closed
    retry_in_s: float  # when denied: how long until a call may be allowed
    token: str | None = None  # a half-open probe's lease: pass to record() or release()


# KEYS: the breaker's hash, its probe leases (sorted set: token -> expiry)
# ARGV: now, open_s, half_open_probes, probe_lease_s, token
ALLOW_LUA = """
local key, leases = KEYS[1], KEYS[2]
local now, open_s, probes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease_s, token = tonumber(ARGV[4]), ARGV[5]
local forced = redis.call('HGET', key, 'forced')
if forced == 'open' then return {0, 'forced_open', tostring(open_s)} end
if forced == 'closed' then return {1, 'forced_closed', '0'} end
local st = redis.call('HGET', key, 'state') or 'closed'
if st == 'open' then
  local since = now - tonumber(redis.call('HGET', key, 'opened_at') or now)
  if since < open_s then return {0, 'open', tostring(open_s - since)} end
  redis.call('HSET', key, 'state', 'half_open', 'probe_fails', 0)
  redis.call('DEL', leases)
  st = 'half_open'
end
if st == 'half_open' then
  -- a lease past its expiry is a probe that never reported: its slot is free again
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  if redis.call('ZCARD', leases) >= probes then return {0, 'half_open', '1'} end
  redis.call('ZADD', leases, now + lease_s, token)
  redis.call('PEXPIRE', leases, math.ceil(lease_s * 2000))
  return {1, 'half_open', '0', token}
end
return {1, st, '0'}
"""

# KEYS: the breaker's hash, its probe leases
# ARGV: now, ok (1/0), window_s, min_calls, failure_ratio, consecutive_max, buckets, token,
#       half_open_probes
RECORD_LUA = """
local key, leases, now, ok = KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2] == '1'
local window, min_calls, ratio = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local consecutive_max, buckets, token = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8]
local probes = tonumber(ARGV[9])
if token ~= '' then redis.call('ZREM', leases, token) end
local st = redis.call('HGET', key, 'state') or 'closed'
if redis.call('HGET', key, 'forced') then return st end
local width = window / buckets
local b = math.floor(now / width)
if st == 'half_open' then
  if ok then
    redis.call('HSET', key, 'state', 'closed', 'consecutive', 0)
    redis.call('DEL', leases)
    -- a fresh window: the failures that opened it must not reopen it on the next one
    for i = 0, buckets do redis.call('DEL', key .. ':w:' .. (b - i)) end
    return 'recovered'
  end
  -- the probes are judged together: reopen once all of them failed
  if redis.call('HINCRBY', key, 'probe_fails', 1) < probes then return 'half_open' end
  redis.call('HSET', key, 'state', 'open', 'opened_at', now)
  redis.call('DEL', leases)
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
  redis.call('HSET', key, 'state', 'open', 'opened_at', now, 'consecutive', 0)
  redis.call('HINCRBY', key, 'opened_total', 1)
  return 'open'
end
return 'closed'
"""


class Breakers:
    """The breakers of one deployment, in its Redis.

    ``longest_time_limit_s`` (the tiers' longest ``time_limit_s``) derives the probe
    lease of a breaker whose config leaves ``probe_lease_s`` unset.
    """

    def __init__(self, client: redis.Redis, configs: dict[str, BreakerConfig], *,
                 longest_time_limit_s: float | None = None) -> None:
        self._client = client
        self._configs = configs
        self._derived_lease_s = (longest_time_limit_s or DEFAULT_TIME_LIMIT_S) \
            + PROBE_LEASE_MARGIN_S
        self._allow = client.register_script(ALLOW_LUA)
        self._record = client.register_script(RECORD_LUA)

    def config(self, name: str) -> BreakerConfig:
        return self._configs.get(name) or BreakerConfig()

    def probe_lease_s(self, name: str) -> float:
        """How long a probe of ``name`` holds its slot without a record or release."""
        configured = self.config(name).probe_lease_s
        return self._derived_lease_s if configured is None else configured

    def allow(self, name: str, *, now: float | None = None,
              token: str | None = None) -> BreakerStatus:
        """Whether a call to ``name`` may go ahead now.

        A half-open probe is granted a lease, ``status.token``: settle it with
        ``record(name, ok, token=...)``, or give it back with ``release(name, token)``
        when the call is not made. ``token`` chooses it (e.g. task id, attempt and
        downstream, so a process other than the caller can settle it); default random.
        """
        keys, args = self.allow_call(name, token=token or uuid.uuid4().hex, now=now)
        allowed, state, retry_in, *granted = self._allow(keys=keys, args=args)
        return BreakerStatus(name, _text(state), 0.0 if allowed else float(_text(retry_in)),
                             _text(granted[0]) if granted else None)

    def record(self, name: str, ok: bool, *, now: float | None = None,
               token: str | None = None,
               on_recovered: Callable[[], object] | None = None) -> str:
        """Count one call's outcome and release its probe lease ``token`` (if any);
        returns the state after it. A half-open outcome closes or reopens the breaker,
        which voids every lease; ``on_recovered`` is called when this outcome closed it
        (exactly one caller sees that transition)."""
        keys, args = self.record_call(name, ok, token=token, now=now)
        state = _text(self._record(keys=keys, args=args))
        if state == "recovered":
            if on_recovered is not None:
                on_recovered()
            return "closed"
        return state

    def closed(self, name: str) -> bool:
        """Whether ``name``'s breaker lets every call through (closed, or forced closed)."""
        forced, state = self._client.hmget(Keys.breaker(name), ["forced", "state"])
        if forced:
            return _text(forced) == "closed"
        return state is None or _text(state) == "closed"

    def allow_call(self, name: str, *, token: str, now: float | None = None) -> ScriptCall:
        """Keys and args of :data:`ALLOW_LUA` for ``name`` (a probe's lease: ``token``)."""
        cfg = self.config(name)
        return ([Keys.breaker(name), Keys.breaker_probes(name)],
                [now or time.time(), cfg.open_s, cfg.half_open_probes,
                 self.probe_lease_s(name), token])

    def record_call(self, name: str, ok: bool | None, *, token: str | None = None,
                    now: float | None = None) -> ScriptCall:
        """Keys and args of :data:`RECORD_LUA`: ``ok`` the call's outcome (``None``: no
        outcome, only the lease ``token`` given back; the ledger's settle script alone
        reads that)."""
        cfg = self.config(name)
        return ([Keys.breaker(name), Keys.breaker_probes(name)],
                [now or time.time(), "-" if ok is None else int(ok), cfg.window_s,
                 cfg.min_calls, cfg.failure_ratio, cfg.consecutive_failures, WINDOW_BUCKETS,
                 token or "", cfg.half_open_probes])

    def release(self, name: str, token: str | None) -> bool:
        """Give back a probe's slot without an outcome (allowed, but the call was not
        made); the state stays as it is. ``None`` (no lease: allowed while closed) is a
        no-op. Returns whether a live lease was released."""
        if not token:
            return False
        return bool(self._client.zrem(Keys.breaker_probes(name), token))

    def force(self, name: str, state: str | None) -> None:
        """``"open"`` or ``"closed"`` until forced otherwise; ``None`` lifts it and resets."""
        key = Keys.breaker(name)
        if state is None:
            pipe = self._client.pipeline()
            pipe.hdel(key, "forced", "probes")  # "probes": the counter before leases
            pipe.hset(key, mapping={"state": "closed", "consecutive": 0})
            pipe.delete(Keys.breaker_probes(name))
            pipe.execute()
        else:
            self._client.hset(key, "forced", state)

    def status(self, name: str, *, now: float | None = None) -> dict[str, Any]:
        raw: dict[bytes, bytes] = self._client.hgetall(Keys.breaker(name))  # type: ignore[assignment]
        data = {k.decode(): v.decode() for k, v in raw.items()}
        forced = data.get("forced")
        leased = self._client.zcount(Keys.breaker_probes(name), f"({now or time.time()}", "+inf")
        return {"name": name, "state": f"forced_{forced}" if forced else
                data.get("state", "closed"), "opened_at": data.get("opened_at"),
                "opened_total": int(data.get("opened_total", 0)),
                "consecutive_failures": int(data.get("consecutive", 0)),
                "probes_leased": leased,
                "config": {**self.config(name).model_dump(),
                           "probe_lease_s": self.probe_lease_s(name)}}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
