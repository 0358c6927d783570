"""The seed scenario's downstream ("partner-api"), simulated identically for both sides.

A call takes its class's service time and fails transiently with probability
``fail_rate``; during the outage (``outage_start`` .. ``outage_end``, epoch
seconds) every call hangs for ``timeout_ms`` and then fails, as an HTTP client
timing out on a dead service does. The bench writes that schedule to
:data:`SCHEDULE_KEY` before the first event; each process reads it once.

Every call is counted per event (:data:`CALLS_KEY`); a successful call records
the delivery (:data:`DELIVERED_KEY`: first success time, :data:`EFFECTS_KEY`:
successes, more than one is a duplicate effect). No pipeline import: the stock
worker loads this module too.
"""

from __future__ import annotations

import random
import time

import redis

__all__ = ["CALLS_KEY", "CLASSES", "DELIVERED_KEY", "EFFECTS_KEY", "FAILED_KEY",
           "OUTAGE_CALLS_KEY", "SCHEDULE_KEY", "DownstreamError", "call"]

CALLS_KEY = "seed:calls"  # hash: event id -> downstream calls made for it
DELIVERED_KEY = "seed:delivered"  # hash: event id -> first successful call (epoch s)
EFFECTS_KEY = "seed:effects"  # hash: event id -> successful calls (1 = exactly once)
FAILED_KEY = "seed:failed"  # hash: event id -> 1 when the stock side gave up on it
OUTAGE_CALLS_KEY = "seed:outage_calls"  # counter: calls made while the API was down
SCHEDULE_KEY = "seed:schedule"  # hash: outage_start, outage_end, fail_rate, timeout_ms

# class -> (event type, share of the traffic, tier it is routed to, service time ms)
CLASSES: dict[str, tuple[str, float, str, float]] = {
    "reward": ("reward.granted", 0.05, "critical", 20.0),
    "game": ("game.updated", 0.20, "high", 20.0),
    "interaction": ("interaction.clicked", 0.50, "standard", 30.0),
    "analytics": ("analytics.tracked", 0.25, "bulk", 40.0),
}
SERVICE_MS = {etype: ms for etype, _, _, ms in CLASSES.values()}  # event type -> ms


class DownstreamError(RuntimeError):
    """The partner API failed (503, or a timeout during the outage)."""


_schedule: dict[str, float] = {}  # this process's copy of SCHEDULE_KEY


def _load(client: redis.Redis) -> dict[str, float]:
    if not _schedule:
        raw: dict[bytes, bytes] = client.hgetall(SCHEDULE_KEY)  # type: ignore[assignment]
        if not raw:
            raise RuntimeError(f"{SCHEDULE_KEY} is not set: the bench writes it first")
        _schedule.update({k.decode(): float(v) for k, v in raw.items()})
    return _schedule


def call(client: redis.Redis, event_id: str, event_type: str) -> None:
    """One call to the partner API on behalf of ``event_id``."""
    plan = _load(client)
    client.hincrby(CALLS_KEY, event_id, 1)
    if plan["outage_start"] <= time.time() < plan["outage_end"]:
        client.incr(OUTAGE_CALLS_KEY)
        time.sleep(plan["timeout_ms"] / 1000)
        raise DownstreamError("partner-api timed out (outage)")
    time.sleep(SERVICE_MS.get(event_type, 20.0) / 1000)
    if random.random() < plan["fail_rate"]:
        raise DownstreamError("partner-api answered 503")
    pipe = client.pipeline(transaction=False)
    pipe.hsetnx(DELIVERED_KEY, event_id, repr(time.time()))
    pipe.hincrby(EFFECTS_KEY, event_id, 1)
    pipe.execute()
