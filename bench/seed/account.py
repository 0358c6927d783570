"""Pure accounting of one side of the seed scenario: from what was sent and what the
downstream and the DLQ saw, each event's outcome, per-class figures and latency
over time. No I/O, so it is tested without a broker."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.common import percentile

__all__ = ["Observed", "Sent", "counter_totals", "describe_runs", "summarize"]

OUTCOMES = ("delivered", "dead_lettered", "failed_logged", "unsettled")


@dataclass(frozen=True)
class Sent:
    event_id: str
    cls: str  # traffic class (bench.seed.downstream.CLASSES)
    at: float  # epoch s, just before the send call


@dataclass
class Observed:
    delivered: dict[str, float] = field(default_factory=dict)  # id -> first success (epoch s)
    effects: dict[str, int] = field(default_factory=dict)  # id -> successful calls
    calls: dict[str, int] = field(default_factory=dict)  # id -> downstream calls
    dead_lettered: set[str] = field(default_factory=set)  # ids with a DLQ record
    failed_logged: set[str] = field(default_factory=set)  # ids the stock side gave up on
    broker_holds: int = 0  # messages still queued, unacked or scheduled at the end


def outcome(event_id: str, seen: Observed) -> str:
    if event_id in seen.delivered:
        return "delivered"
    if event_id in seen.dead_lettered:
        return "dead_lettered"
    if event_id in seen.failed_logged:
        return "failed_logged"
    return "unsettled"


def summarize(sent: list[Sent], seen: Observed, *, t0: float, outage: tuple[float, float],
              bucket_s: float) -> dict[str, Any]:
    """Per class and in all: outcome counts and %, lost, duplicates, downstream calls
    per event, latency (s) in all / outside the outage / per ``bucket_s`` of send time.

    Lost = neither delivered nor dead-lettered nor still held by the broker: an event
    the stock side gave up on (only logged), or one that left no trace. An event still
    held when the run stopped is ``unsettled``, not lost."""
    by_class: dict[str, list[Sent]] = defaultdict(list)
    for s in sent:
        by_class[s.cls].append(s)
    classes = {cls: _one_class(items, seen, t0=t0, outage=outage, bucket_s=bucket_s)
               for cls, items in by_class.items()}
    classes["all"] = _one_class(sent, seen, t0=t0, outage=outage, bucket_s=bucket_s)
    return classes


def _one_class(items: list[Sent], seen: Observed, *, t0: float, outage: tuple[float, float],
               bucket_s: float) -> dict[str, Any]:
    counts = dict.fromkeys(OUTCOMES, 0)
    latency: list[float] = []
    outside: list[float] = []
    slowest: list[tuple[float, float, int]] = []  # outside the outage: (latency, sent at, calls)
    buckets: dict[int, list[float]] = defaultdict(list)
    calls: list[int] = []
    for s in items:
        counts[outcome(s.event_id, seen)] += 1
        calls.append(seen.calls.get(s.event_id, 0))
        done = seen.delivered.get(s.event_id)
        if done is None:
            continue
        lat = done - s.at
        latency.append(lat)
        if not outage[0] <= s.at < outage[1]:
            outside.append(lat)
            slowest.append((lat, s.at - t0, seen.calls.get(s.event_id, 0)))
        buckets[int((s.at - t0) // bucket_s)].append(lat)
    n = len(items)
    lost = counts["failed_logged"] + (counts["unsettled"] if seen.broker_holds == 0 else 0)
    return {
        "sent": n, **counts, "lost": lost,
        "pct": {k: 100.0 * v / n if n else 0.0 for k, v in [*counts.items(), ("lost", lost)]},
        "not_delivered_pct": 100.0 * (n - counts["delivered"]) / n if n else 0.0,
        "duplicates": sum(1 for s in items if seen.effects.get(s.event_id, 0) > 1),
        "calls_per_event": {"mean": sum(calls) / n if n else 0.0,
                            "p99": percentile([float(c) for c in calls], 0.99),
                            "max": max(calls, default=0)},
        "latency_s": {"p50": percentile(latency, 0.5), "p99": percentile(latency, 0.99),
                      "max": max(latency, default=float("nan"))},
        "latency_s_outside_outage": {"p50": percentile(outside, 0.5),
                                     "p99": percentile(outside, 0.99), "n": len(outside),
                                     # the p99 and what is above it: which events miss, why
                                     "slowest": [{"latency_s": lat, "sent_at_s": at,
                                                  "calls": c} for lat, at, c in
                                                 sorted(slowest, reverse=True)[
                                                     :len(outside) // 100 + 1]]},
        # [bucket start s since t0, p50 s, p99 s, events delivered]
        "timeline": [[k * bucket_s, percentile(v, 0.5), percentile(v, 0.99), len(v)]
                     for k, v in sorted(buckets.items())],
    }


def counter_totals(scrape: str, name: str, label: str) -> dict[str, int]:
    """Counter ``name`` summed by ``label`` in one exporter scrape, e.g. settled
    ``pipeline_tasks_total`` runs by ``outcome`` (re-runs of deferred events
    included): the work the workers did."""
    totals: dict[str, int] = defaultdict(int)
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name:
                totals[sample.labels[label]] += int(sample.value)
    return dict(sorted(totals.items()))


def describe_runs(side: dict[str, Any]) -> str:
    """One line of a side's handler runs by outcome and budget refusals per tier
    (``""`` for a side without the pipeline's metrics)."""
    if "runs" not in side:
        return ""
    return ("handler runs by outcome: " + ", ".join(f"{k} {v:,}" for k, v in side["runs"].items())
            + "; retries over the budget (deferred): "
            + ", ".join(f"{k} {v:,}" for k, v in side["budget_refusals"].items()))
