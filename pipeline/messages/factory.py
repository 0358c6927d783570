"""The task message of every try: the first publish, a retry, a deferral, a replay.

Producers, workers and replay build a ``pipeline.handle`` message here and nowhere else,
so a retry carries what its first publish carried (``accepted_at``, the tier's queue and
time limits) and every new publish starts its own lineage of tries.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pipeline.config.model import Settings
from pipeline.messages.task import TaskSpec

__all__ = ["MessageFactory"]

LINEAGE_HEX_CHARS = 12  # length of a lineage id: 48 random bits per publish


class MessageFactory:
    """Task messages for one app's settings; each tier's queue and limits read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._limits: dict[str, tuple[str, float, float]] = {}  # tier -> queue, hard, soft

    def spec(self, event: dict[str, Any], *, handler: str, tier: str, task_id: str,
             attempt: int, first_failed_at: str | None = None,
             priority: int | None = None, accepted_at: float | None = None) -> TaskSpec:
        """The task message for one attempt; ``accepted_at`` (epoch s) is carried from
        the first publish through every retry, for end-to-end latency."""
        queue, hard_s, soft_s = self._tier_limits(tier)
        kwargs: dict[str, Any] = {"handler": handler, "tier": tier, "attempt": attempt,
                                  "accepted_at": accepted_at or time.time(),
                                  # every publish starts its own lineage of tries: settle
                                  # marks of an earlier publish of this task never match
                                  "lineage": uuid.uuid4().hex[:LINEAGE_HEX_CHARS]}
        if first_failed_at:
            kwargs["first_failed_at"] = first_failed_at
        return TaskSpec(queue, task_id, [event], kwargs, priority, hard_s, soft_s)

    def _tier_limits(self, tier: str) -> tuple[str, float, float]:
        found = self._limits.get(tier)
        if found is None:
            cfg = self.settings.tier(tier)
            found = self._limits[tier] = (cfg.queue_name(tier), cfg.time_limit_s,
                                          cfg.soft_time_limit_s)
        return found
