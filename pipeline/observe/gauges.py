"""What the broker says about each tier, read in one round trip.

The exporter reads this on every scrape and ``pipeline status`` on every refresh,
so it must stay cheap however much is queued: on a Redis broker a single Lua call
does, per tier, ``LLEN`` and ``LINDEX -1`` on each of the ten priority sub-lists
(kombu ``LPUSH``es and consumers ``BRPOP``, so the right end is the oldest
message), ``ZCARD`` of the retry set and a read of the heartbeat hash; then the
DLQ's ``LLEN``, the eviction counter and the per-minute outcome counters. Each is
O(1) (the heartbeat hash is O(workers)). The oldest message's
``pipeline_enqueued_at`` header is cut out of it inside Redis, so a large
payload never crosses the network.

On RabbitMQ the depth comes from a passive ``queue_declare`` per tier (a queue
not declared yet reads as depth 0 with ``declared`` false) and the age of the
oldest message is unknown (RabbitMQ cannot peek); everything else is read from
the state Redis the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError

from pipeline.core.state import Keys
from pipeline.errors import BrokerUnavailable
from pipeline.messages.task import redis_list_key
from pipeline.observe.heartbeat import HEARTBEAT_STALE_S, workers_key
from pipeline.observe.outcomes import per_minute, window_keys

if TYPE_CHECKING:
    from pipeline.worker.runtime import Runtime

__all__ = ["DLQ_EVICTIONS_KEY", "RATE_OUTCOMES", "Snapshot", "TierReading", "read_snapshot"]

PRIORITIES = range(10)  # kombu priority sub-lists, as the app configures them
RATE_OUTCOMES = ("succeeded", "retried", "dead_lettered", "failed")  # read for status
DLQ_EVICTIONS_KEY = f"{Keys.prefix}dlq:evictions"  # INCRed by DLQ retention

# One op per key (ARGV[2 + i] for KEYS[i]); ARGV[1] = heartbeat fresh-since (epoch s).
# Every result is a string: "list" -> "<len> <enqueued_at or ->", "workers" ->
# "<online> <in flight>", the others a number.
_READ_LUA = """
local fresh_since = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local op = ARGV[i + 1]
  if op == 'list' then
    local n = redis.call('LLEN', key)
    local at = '-'
    if n > 0 then
      local raw = redis.call('LINDEX', key, -1)
      local _, stop = string.find(raw, '"pipeline_enqueued_at":', 1, true)
      if stop then at = string.match(raw, '^%s*([-0-9.eE+]+)', stop + 1) or '-' end
    end
    out[i] = n .. ' ' .. at
  elseif op == 'llen' then
    out[i] = tostring(redis.call('LLEN', key))
  elseif op == 'zcard' then
    out[i] = tostring(redis.call('ZCARD', key))
  elseif op == 'get' then
    out[i] = redis.call('GET', key) or '0'
  elseif op == 'workers' then
    local online, held = 0, 0
    for _, v in ipairs(redis.call('HVALS', key)) do
      local seen, n = string.match(v, '^(%S+)%s+(%S+)')
      if seen and tonumber(seen) >= fresh_since then
        online = online + 1
        held = held + (tonumber(n) or 0)
      end
    end
    out[i] = online .. ' ' .. held
  end
end
return out
"""


@dataclass(frozen=True)
class TierReading:
    """One tier as the broker sees it."""

    tier: str
    queue: str
    depth: int
    oldest_age_s: float | None  # None: empty queue, or unknown (RabbitMQ, foreign message)
    retries_pending: int
    workers_online: int
    in_flight: int  # held unacknowledged by this tier's workers (heartbeat, <= 5 s old)
    slo_s: float
    max_depth: int
    per_minute: dict[str, float] = field(default_factory=dict)  # outcome -> sliding rate
    declared: bool = True  # False: a RabbitMQ queue no worker has declared yet (depth 0)

    @property
    def late(self) -> bool:
        """The oldest queued message is older than the tier's SLO."""
        return self.oldest_age_s is not None and self.oldest_age_s > self.slo_s


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    tiers: list[TierReading]
    dlq_depth: int
    dlq_evictions: int

    @property
    def late(self) -> list[str]:
        return [t.tier for t in self.tiers if t.late]


class _Plan:
    """Keys and ops for the Lua reader, remembering where each answer lands."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.ops: list[str] = []

    def add(self, op: str, key: str) -> int:
        self.keys.append(key)
        self.ops.append(op)
        return len(self.keys) - 1


def oldest_age(lists: list[str], now: float) -> float | None:
    """Age of the oldest message over a tier's sub-list answers ``"<len> <at|->"``."""
    stamps = []
    for answer in lists:
        length, at = answer.split(" ", 1)
        if int(length) > 0 and at != "-":
            stamps.append(float(at))
    return max(0.0, now - min(stamps)) if stamps else None


def read_snapshot(runtime: Runtime, now: float | None = None) -> Snapshot:
    """Read every tier's gauges; raises BrokerUnavailable when the broker does not answer."""
    settings = runtime.settings
    on_redis = settings.broker_is_redis
    now = time.time() if now is None else now
    plan = _Plan()
    where: dict[str, dict[str, Any]] = {}
    for tier in settings.tiers:
        queue = settings.queue_for(tier)
        spots: dict[str, Any] = {
            "lists": [plan.add("list", redis_list_key(queue, p)) for p in PRIORITIES]
            if on_redis else [],
            "retries": plan.add("zcard", Keys.retries(queue)),
            "workers": plan.add("workers", workers_key(tier)),
        }
        for outcome in RATE_OUTCOMES:
            current, previous = window_keys(tier, outcome, now)
            spots[outcome] = (plan.add("get", current), plan.add("get", previous))
        where[tier] = spots
    dlq_spot = plan.add("llen", settings.dead_letter_queue) if on_redis else -1
    evictions_spot = plan.add("get", DLQ_EVICTIONS_KEY)
    try:
        script = runtime.state.register_script(_READ_LUA)
        raw = script(keys=plan.keys, args=[now - HEARTBEAT_STALE_S, *plan.ops])
        answers = [a.decode() if isinstance(a, bytes) else str(a) for a in raw]
        depths = {} if on_redis else {t: runtime.publisher.queue_reading(t)
                                      for t in settings.tiers}
        dlq_depth = int(answers[dlq_spot]) if on_redis else runtime.dlq.depth()
    except (redis.RedisError, OperationalError, OSError) as exc:
        raise BrokerUnavailable(f"could not read the broker: {exc}") from exc
    readings = []
    for tier, spots in where.items():
        cfg = settings.tier(tier)
        lists = [answers[i] for i in spots["lists"]]
        online, held = (int(x) for x in answers[spots["workers"]].split())
        readings.append(TierReading(
            tier=tier, queue=settings.queue_for(tier),
            depth=sum(int(a.split(" ", 1)[0]) for a in lists) if on_redis else depths[tier][0],
            declared=on_redis or depths[tier][1],
            oldest_age_s=oldest_age(lists, now), retries_pending=int(answers[spots["retries"]]),
            workers_online=online, in_flight=held, slo_s=cfg.slo_s, max_depth=cfg.max_depth,
            per_minute={o: per_minute(int(answers[spots[o][0]]), int(answers[spots[o][1]]), now)
                        for o in RATE_OUTCOMES},
        ))
    return Snapshot(taken_at=now, tiers=readings, dlq_depth=dlq_depth,
                    dlq_evictions=int(answers[evictions_spot]))
