"""Tiers and classification: which queue, workers and retry policy an event gets.

Pure logic, no I/O: :func:`classify` maps an event to a tier name using the
config's rules (first match wins), an explicit ``tier`` on the event winning
when it names a known tier.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.core.events import TIER_PATTERN, Event
from pipeline.core.pools import Pool

__all__ = ["Rule", "TierConfig", "classify"]


class TierConfig(BaseModel):
    """Everything that differs between tiers. Every field has a default, so a
    tier is declared with only what differs from an ordinary ``standard`` tier."""

    model_config = ConfigDict(extra="forbid")

    #: broker queue of the tier. Unset: the tier's name.
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] | None = None
    #: Celery pool of the tier's workers: `"prefork"` (processes), `"threads"` or
    #: `"gevent"` (greenlets; needs the `gevent` extra) for handlers that wait on I/O.
    #: `pipeline worker --tier` passes it as `--pool`.
    pool: Pool = "prefork"
    #: per tier worker: processes (prefork) or threads/greenlets (threads, gevent);
    #: `pipeline worker --tier` passes it as `-c`.
    concurrency: Annotated[int, Field(ge=1, le=512)] = 2
    #: a `threads` or `gevent` pool cannot kill a handler at `time_limit_s` (threads:
    #: no limit at all; gevent: only at its next I/O): set true once the handler's own
    #: calls carry timeouts that end it before then. `pipeline config check` refuses
    #: such a tier without it.
    accept_unenforced_time_limit: bool = False
    #: messages reserved per process; 1 for latency-sensitive tiers.
    prefetch_multiplier: Annotated[int, Field(ge=1, le=1000)] = 4
    #: retries after the first attempt; attempts in all = max_retries + 1.
    max_retries: Annotated[int, Field(ge=0, le=1000)] = 5
    #: first backoff window; attempt n waits
    #: `uniform(0, min(backoff_max_s, backoff_base_s * 2**(n-1)))`.
    backoff_base_s: Annotated[float, Field(gt=0)] = 2.0
    #: cap on one backoff window.
    backoff_max_s: Annotated[float, Field(gt=0)] = 300.0
    #: `SoftTimeLimitExceeded` is raised in the handler after this long (retryable).
    #: Must be below `time_limit_s`.
    soft_time_limit_s: Annotated[float, Field(gt=0)] = 60.0
    #: the worker child is killed after this long; counts as a failed attempt.
    time_limit_s: Annotated[float, Field(gt=0)] = 90.0
    #: Celery rate limit per worker, e.g. `"100/s"`, applied by a worker serving this
    #: tier alone. Unset: unlimited.
    rate_limit: Annotated[str, Field(pattern=r"^\d+(\.\d+)?/[smh]$")] | None = None
    #: admission control refuses new events past this many queued; `0` = unbounded.
    max_depth: Annotated[int, Field(ge=0)] = 0
    #: past `max_depth`: `"reject"` (publish says `rejected: tier_full`, HTTP 429 with
    #: `Retry-After`) or `"accept"` (never refuse; the built-in `critical` tier).
    overflow: Literal["reject", "accept"] = "reject"
    #: tries lost with their worker process (crash, OOM, SIGKILL) before the work is
    #: dead-lettered as `max_deliveries`; each lost try counts as a failed attempt.
    max_deliveries: Annotated[int, Field(ge=1, le=100)] = 3
    #: a worker of this tier not heard from for this long (its main process killed,
    #: its broker connection lost) has its prefetched and running messages put back
    #: on their queue by any live worker (Redis brokers).
    lost_after_s: Annotated[float, Field(ge=2, le=3600)] = 15.0
    #: exception classes (dotted paths or builtin names) that are retried.
    retry_on: list[str] = Field(default_factory=lambda: ["Exception"])
    #: exception classes never retried (checked first); `PermanentError` never is.
    dont_retry_on: list[str] = Field(default_factory=list)
    #: the tier is late when its oldest queued message is older than this
    #: (`pipeline status` exits 1, the `PipelineTierOldestMessageOverSLO` alert fires;
    #: the exporter publishes it as `pipeline_tier_slo_seconds`).
    slo_s: Annotated[float, Field(gt=0)] = 300.0
    #: retry budget: retries per window stay under this fraction of first attempts
    #: (retries beyond it are deferred, not dropped, not counted); `0` = no budget.
    #: A retry that succeeds gives its charge back, so the budget holds back retries
    #: that keep failing, not a recovered downstream's backlog: 0.5 lets up to half
    #: of all calls fail without delay and caps an outage's retries at half.
    retry_budget_ratio: Annotated[float, Field(ge=0, le=10)] = 0.5
    #: retries always admitted per window, however few first attempts there were
    #: (10/s over the default window, Finagle's minimum): once traffic ebbs, the
    #: retries an outage left still drain.
    retry_budget_min: Annotated[int, Field(ge=0)] = 100
    #: sliding window of the retry budget.
    retry_budget_window_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    #: retried work goes one priority step behind fresh events of the same priority
    #: and deferred work two, so a backlog an outage leaves delays neither new events
    #: nor their retries (Redis brokers; RabbitMQ keeps the event's priority). It can
    #: wait while fresh work fills the tier; deferrals still expire at `max_defer_age_s`.
    retries_yield: bool = True
    #: deferred work (breaker open, over budget, handler asked) older than this,
    #: counted from acceptance, is dead-lettered as `expired`.
    max_defer_age_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    #: Celery task events (what Flower shows live) from this tier's workers. Each
    #: costs the worker's main process a broker round trip per task state, so a
    #: throughput tier may turn them off; the pipeline's metrics and status still work.
    task_events: bool = True
    #: events per `pipeline.handle_batch` message on this tier (packed at publish);
    #: `0` = no batching.
    batch_size: Annotated[int, Field(ge=0, le=10_000)] = 0
    #: how long a single publish waits for concurrent ones to share its batch message.
    batch_wait_ms: Annotated[int, Field(ge=0, le=10_000)] = 0

    @model_validator(mode="after")
    def _limits_are_ordered(self) -> TierConfig:
        if self.soft_time_limit_s >= self.time_limit_s:
            raise ValueError(
                f"soft_time_limit_s ({self.soft_time_limit_s}) must be below "
                f"time_limit_s ({self.time_limit_s})"
            )
        if self.backoff_base_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_base_s ({self.backoff_base_s}) must not exceed "
                f"backoff_max_s ({self.backoff_max_s})"
            )
        return self

    def queue_name(self, tier: str) -> str:
        return self.queue or tier

    @property
    def longest_unacked_s(self) -> float:
        """Longest a delivered message can stay unacknowledged: its own hard time
        limit plus the prefetched messages ahead of it in the same process."""
        return self.time_limit_s * (self.prefetch_multiplier + 1)


class Rule(BaseModel):
    """``type`` (glob) and/or ``source`` (glob) -> ``tier``. First matching rule wins."""

    model_config = ConfigDict(extra="forbid")

    #: glob (`fnmatch`, case-sensitive) on the event's `type`.
    type: str | None = None
    #: glob on the event's `source`. A rule needs `type` or `source`; with both, both
    #: must match.
    source: str | None = None
    #: the tier the matching events go to.
    tier: Annotated[str, Field(pattern=TIER_PATTERN)]

    @model_validator(mode="after")
    def _matches_something(self) -> Rule:
        if self.type is None and self.source is None:
            raise ValueError(f"rule for tier {self.tier!r} needs a 'type' or a 'source' glob")
        return self

    def matches(self, event_type: str, source: str) -> bool:
        if self.type is not None and not fnmatch.fnmatchcase(event_type, self.type):
            return False
        return self.source is None or fnmatch.fnmatchcase(source, self.source)


def classify(
    event: Event,
    rules: Sequence[Rule],
    tiers: Mapping[str, object],
    default_tier: str,
) -> str:
    """The tier for ``event``: its explicit known tier, else the first matching rule,
    else ``default_tier``."""
    if event.tier is not None and event.tier in tiers:
        return event.tier
    for rule in rules:
        if rule.matches(event.type, event.source):
            return rule.tier
    return default_tier
