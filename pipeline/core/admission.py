"""Admission control: how many of a batch a tier takes before it is full.

Pure logic. A tier with ``max_depth`` > 0 and ``overflow = "reject"`` refuses
events once its queue holds ``max_depth`` messages (producers see
``rejected: tier_full``, HTTP clients 429 with ``Retry-After``); ``overflow =
"accept"`` (critical tiers) never refuses. Depth is read from the broker at
most every ``admission_cache_s`` and advanced locally by what this producer
enqueued since, so a burst costs no extra round trips.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DepthCache", "admitted"]

TIER_FULL = "tier_full"  # rejection reason when a tier is at max_depth


def admitted(depth: int, incoming: int, *, max_depth: int, overflow: str) -> int:
    """How many of ``incoming`` events a tier holding ``depth`` messages takes."""
    if max_depth <= 0 or overflow == "accept":
        return incoming
    return max(0, min(incoming, max_depth - depth))


@dataclass
class _Reading:
    depth: int
    read_at: float


class DepthCache:
    """Queue depths per tier, re-read from the broker at most every ``ttl_s``."""

    def __init__(self, read: Callable[[str], int], ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._ttl_s = ttl_s
        self._clock = clock
        self._readings: dict[str, _Reading] = {}

    def depth(self, tier: str) -> int:
        now = self._clock()
        reading = self._readings.get(tier)
        if reading is None or now - reading.read_at >= self._ttl_s:
            reading = _Reading(self._read(tier), now)
            self._readings[tier] = reading
        return reading.depth

    def added(self, tier: str, count: int) -> None:
        """Count messages this producer enqueued since the last reading."""
        reading = self._readings.get(tier)
        if reading is not None:
            reading.depth += count
