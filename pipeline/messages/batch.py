"""The message of a batched tier: ``pipeline.handle_batch``, many events of one handler.

Producers pack events into it (:mod:`pipeline.producer.enqueue`); a worker runs each event
as one attempt (:mod:`pipeline.worker.batch`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pipeline.config.model import Settings
from pipeline.core.names import BATCH_TASK_NAME
from pipeline.messages.task import TaskSpec

__all__ = ["batch_spec"]


def batch_spec(settings: Settings, events: Sequence[dict[str, Any]], *, handler: str, tier: str,
               accepted_at: float) -> TaskSpec:
    """The ``pipeline.handle_batch`` message for ``events`` (all for ``handler``)."""
    cfg = settings.tier(tier)
    hard_s = cfg.time_limit_s * max(1, len(events) // 10)  # a batch runs many handlers
    return TaskSpec(
        queue=cfg.queue_name(tier), task_id=str(uuid.uuid4()), args=[list(events)],
        kwargs={"handler": handler, "tier": tier, "attempt": 1, "accepted_at": accepted_at,
                "lineage": uuid.uuid4().hex[:12]},
        time_limit_s=hard_s, soft_time_limit_s=hard_s * 0.9, task=BATCH_TASK_NAME)
