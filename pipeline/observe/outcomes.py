"""Rolling per-minute task outcome counts in Redis, for ``pipeline status``.

Prometheus answers "how many per second" for dashboards, but ``pipeline status``
must work with no Prometheus at all. So every settled task also counts into
``pipeline:stats:<tier>:<outcome>:<minute>`` (buffered: at most one pipelined
round trip per process per second, and a timer writes what an idle process still
holds a second later, so ``ok/min`` is right within seconds).
A reader takes the current and the previous minute and weighs the previous one by
the part of the current minute not yet elapsed (a sliding-window estimate), so the
rate neither drops to zero nor doubles at a minute boundary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import redis

from pipeline.core.state import Keys

__all__ = ["RATE_TTL_S", "OutcomeRates", "flush", "minute_of", "per_minute", "rate_key",
           "window_keys"]

log = logging.getLogger(__name__)

RATE_TTL_S = 3600  # per-minute counters are kept this long
MINUTE_S = 60  # width of one counter's window
FLUSH_EVERY_S = 1.0  # buffered outcome counts are written at most this often


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
    """Counts task outcomes per tier and minute; never raises into a task.

    Counts are buffered in the process and written at most once per
    ``FLUSH_EVERY_S`` (one pipelined round trip for all of them): a blocking
    round trip per task cost a fifth of a pool process's time in the overhead
    benchmark. The first count of a process is written at once; counts buffered
    after it are written by the next count past the second, or by a timer thread
    :data:`FLUSH_EVERY_S` later (a pool process that goes idle holds nothing
    longer than that), and at pool-process shutdown (:func:`flush`).
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def incr(self, tier: str, outcome: str, now: float | None = None, count: int = 1) -> None:
        now = time.time() if now is None else now
        buffer = _buffer()
        with buffer.lock:
            buffer.pending[rate_key(tier, outcome, minute_of(now))] += count
            buffer.client = self._client
        if now - buffer.flushed_at >= FLUSH_EVERY_S:
            flush(now)
        elif buffer.timer is None or not buffer.timer.is_alive():
            buffer.timer = threading.Timer(FLUSH_EVERY_S, flush)
            buffer.timer.daemon = True  # a process may exit without waiting for it
            buffer.timer.start()


def flush(now: float | None = None) -> None:
    """Write this process's buffered counts now (also at pool-process shutdown)."""
    buffer = _buffer()
    with buffer.lock:  # the timer thread and a task may flush at once
        if not buffer.pending or buffer.client is None:
            return
        pending, buffer.pending = buffer.pending, Counter()
        buffer.flushed_at = time.time() if now is None else now
        try:
            pipe = buffer.client.pipeline(transaction=False)
            for key, n in pending.items():
                pipe.incrby(key, n)
                pipe.expire(key, RATE_TTL_S)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:  # a statistic is not worth a failed task
            log.debug("could not write %d outcome counts: %s", len(pending), exc)


@dataclass
class _Buffer:
    pid: int
    pending: Counter[str] = field(default_factory=Counter)
    flushed_at: float = 0.0
    client: redis.Redis | None = None
    timer: threading.Timer | None = None  # writes what is still buffered a second later
    lock: threading.Lock = field(default_factory=threading.Lock)


_buffers: dict[int, _Buffer] = {}  # by pid: a forked pool process starts empty
_buffers_lock = threading.Lock()  # two threads' first counts must not make two buffers


def _buffer() -> _Buffer:
    pid = os.getpid()
    found = _buffers.get(pid)
    if found is None:
        with _buffers_lock:
            found = _buffers.get(pid)
            if found is None:
                _buffers.clear()
                found = _buffers[pid] = _Buffer(pid)
    return found
