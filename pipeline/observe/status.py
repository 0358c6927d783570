"""``pipeline status``: is any tier late? One screen, or JSON for scripts.

Per tier: depth, age of the oldest message against the tier's ``slo_s``, messages
held by workers, retries pending, succeeded and failed per minute, workers online;
then the DLQ's depth and its largest fingerprint groups. Everything but the DLQ
groups comes from :func:`pipeline.observe.gauges.read_snapshot` (one round trip); the
exit code is 1 when any tier is late, for cron and scripts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pipeline.observe.gauges import Snapshot, TierReading, read_snapshot

if TYPE_CHECKING:
    from pipeline.worker.runtime import Runtime

__all__ = ["EXIT_LATE", "build_report", "format_age", "render_text"]

EXIT_LATE = 1  # some tier's oldest message is older than its SLO
TOP_FINGERPRINTS = 5  # DLQ fingerprint groups shown
FAILED_OUTCOMES = ("retried", "dead_lettered", "failed")  # attempts that did not succeed


def format_age(seconds: float | None) -> str:
    """``-``, ``850ms``, ``12.3s``, ``4m05s``, ``2h13m``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _tier_dict(t: TierReading) -> dict[str, Any]:
    return {
        "tier": t.tier, "queue": t.queue, "depth": t.depth,
        "oldest_age_s": None if t.oldest_age_s is None else round(t.oldest_age_s, 3),
        "slo_s": t.slo_s, "late": t.late, "in_flight": t.in_flight,
        "retries_pending": t.retries_pending,
        "succeeded_per_min": round(t.per_minute.get("succeeded", 0.0), 1),
        "failed_per_min": round(sum(t.per_minute.get(o, 0.0) for o in FAILED_OUTCOMES), 1),
        "dead_lettered_per_min": round(t.per_minute.get("dead_lettered", 0.0), 1),
        "workers_online": t.workers_online, "max_depth": t.max_depth,
        "declared": t.declared,
    }


def _dlq_top(runtime: Runtime) -> list[dict[str, Any]]:
    """The largest DLQ fingerprint groups."""
    groups = runtime.dlq.stats()[:TOP_FINGERPRINTS]
    return [{"fingerprint": str(g.fingerprint), "count": int(g.count),
             "exception": str(g.exception), "handler": str(g.handler)} for g in groups]


def build_report(runtime: Runtime, snapshot: Snapshot | None = None) -> dict[str, Any]:
    """The JSON-ready status of every tier and the DLQ."""
    snap = snapshot or read_snapshot(runtime)
    dlq: dict[str, Any] = {"depth": snap.dlq_depth, "evictions": snap.dlq_evictions}
    if snap.dlq_depth:
        dlq["top"] = _dlq_top(runtime)
    return {
        "taken_at": datetime.fromtimestamp(snap.taken_at, UTC).isoformat(),
        "late": snap.late,
        "tiers": [_tier_dict(t) for t in snap.tiers],
        "dlq": dlq,
        "breakers": _breakers(runtime),
    }


def _breakers(runtime: Runtime) -> list[dict[str, Any]]:
    """Each configured downstream's breaker: its state and how often it opened."""
    return [{k: v for k, v in runtime.breakers.status(n).items() if k != "config"}
            for n in runtime.settings.breakers]


def render_text(report: dict[str, Any]) -> str:
    """A fixed-width table for a terminal."""
    head = (f"{'tier':<12}{'depth':>9}{'oldest':>9}{'slo':>8}{'in flight':>11}"
            f"{'retries':>9}{'ok/min':>9}{'failed/min':>12}{'workers':>9}")
    lines = [head]
    for t in report["tiers"]:
        flag = ("  LATE" if t["late"] else "") + ("" if t.get("declared", True)
                                                  else "  (queue not declared yet)")
        lines.append(
            f"{t['tier']:<12}{t['depth']:>9}{format_age(t['oldest_age_s']):>9}"
            f"{format_age(t['slo_s']):>8}{t['in_flight']:>11}{t['retries_pending']:>9}"
            f"{t['succeeded_per_min']:>9.1f}{t['failed_per_min']:>12.1f}"
            f"{t['workers_online']:>9}{flag}")
    dlq = report["dlq"]
    lines.append("")
    lines.append(f"DLQ: {dlq['depth']} record(s), {dlq['evictions']} evicted by retention")
    for g in dlq.get("top") or []:
        lines.append(f"  {g['count']:>7}x  {g['fingerprint']}  {g['handler'] or '-'}  "
                     f"{g['exception']}")
    for b in report.get("breakers") or []:
        lines.append(f"breaker {b['name']}: {b['state']} (opened {b['opened_total']} time(s))")
    late = [t for t in report["tiers"] if t["late"]]
    if late:
        lines.append("")
        lines.extend(f"LATE: {t['tier']}: oldest message {format_age(t['oldest_age_s'])} "
                     f"> slo {format_age(t['slo_s'])}"
                     + ("" if t["workers_online"] else " (no worker online)") for t in late)
    return "\n".join(lines)
