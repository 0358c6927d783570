"""Rolling per-minute task outcome counts in Redis, for ``pipeline status``.

Prometheus answers "how many per second" for dashboards, but ``pipeline status``
must work with no Prometheus at all. So every settled task also does one cheap
round trip: ``INCR pipeline:stats:<tier>:<outcome>:<minute>`` and an ``EXPIRE``.
A reader takes the current and the previous minute and weighs the previous one by
the part of the current minute not yet elapsed (a sliding-window estimate), so the
rate neither drops to zero nor doubles at a minute boundary.
"""

from __future__ import annotations

import logging
import time

import redis

from pipeline.state import Keys

__all__ = ["RATE_TTL_S", "OutcomeRates", "minute_of", "per_minute", "rate_key",
           "window_keys"]

log = logging.getLogger(__name__)

RATE_TTL_S = 3600  # per-minute counters are kept this long
MINUTE_S = 60  # width of one counter's window


def minute_of(now: float) -> int:
    """The minute number (epoch seconds // 60) ``now`` falls in."""
    return int(now // MINUTE_S)


def rate_key(tier: str, outcome: str, minute: int) -> str:
    """``pipeline:stats:<tier>:<outcome>:<minute>``."""
    return f"{Keys.prefix}stats:{tier}:{outcome}:{minute}"


def window_keys(tier: str, outcome: str, now: float) -> tuple[str, str]:
    """(the current minute's key, the previous minute's key)."""
    minute = minute_of(now)
    return rate_key(tier, outcome, minute), rate_key(tier, outcome, minute - 1)


def per_minute(current: int, previous: int, now: float) -> float:
    """Sliding one-minute rate from the counts of the current and previous minute.

    ``current`` covers the elapsed part of this minute; the previous minute stands
    in for the rest, in proportion.
    """
    elapsed = (now % MINUTE_S) / MINUTE_S
    return current + previous * (1.0 - elapsed)


class OutcomeRates:
    """Counts task outcomes per tier and minute; never raises into a task."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def incr(self, tier: str, outcome: str, now: float | None = None, count: int = 1) -> None:
        key = rate_key(tier, outcome, minute_of(time.time() if now is None else now))
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.incrby(key, count)
            pipe.expire(key, RATE_TTL_S)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:  # a statistic is not worth a failed task
            log.debug("could not count outcome %s of tier %s: %s", outcome, tier, exc)
