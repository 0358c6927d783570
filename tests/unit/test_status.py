"""``pipeline status`` rendering and the SLO logic, from a given snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.config.load import load_settings
from pipeline.core.tiers import TierConfig
from pipeline.observe.gauges import Snapshot, TierReading, oldest_age
from pipeline.observe.status import build_report, format_age, render_text


def reading(tier: str, **fields: Any) -> TierReading:
    values: dict[str, Any] = {"queue": tier, "depth": 0, "oldest_age_s": None,
                              "retries_pending": 0, "workers_online": 1, "in_flight": 0,
                              "slo_s": 30.0, "max_depth": 0,
                              "per_minute": {"succeeded": 120.0, "retried": 3.0,
                                             "dead_lettered": 1.0, "failed": 0.0}}
    values.update(fields)
    return TierReading(tier=tier, **values)


@dataclass
class Group:
    fingerprint: str
    count: int
    exception: str
    handler: str


class FakeDlq:
    def stats(self) -> list[Group]:  # as DeadLetterQueue.stats: the largest group first
        return [Group("bbb", 9, "KeyError", "h2"), Group("aaa", 2, "ValueError", "h1")]


class FakeSettings:
    breakers: dict[str, object] = {}


class FakeRuntime:
    dlq = FakeDlq()
    settings = FakeSettings()


def snapshot(*tiers: TierReading, dlq_depth: int = 0) -> Snapshot:
    return Snapshot(taken_at=1_800_000_000.0, tiers=list(tiers), dlq_depth=dlq_depth,
                    dlq_evictions=4)


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0.85, "850ms"), (12.34, "12.3s"), (245, "4m05s"), (7980, "2h13m")])
def test_ages_are_shown_in_the_unit_that_reads_best(seconds: float | None, text: str) -> None:
    assert format_age(seconds) == text


def test_a_tier_is_late_only_when_its_oldest_message_is_older_than_its_slo() -> None:
    assert reading("t", oldest_age_s=30.5, slo_s=30).late
    assert not reading("t", oldest_age_s=29.0, slo_s=30).late
    assert not reading("t", oldest_age_s=None, slo_s=0.001).late  # empty queue


def test_report_lists_late_tiers_and_sums_failed_attempts() -> None:
    report = build_report(FakeRuntime(), snapshot(  # type: ignore[arg-type]
        reading("critical", depth=3, oldest_age_s=9.0, slo_s=5.0, workers_online=0),
        reading("bulk", depth=10, oldest_age_s=9.0, slo_s=3600.0)))
    assert report["late"] == ["critical"]
    critical = report["tiers"][0]
    assert critical["failed_per_min"] == 4.0  # retried + dead_lettered + failed
    assert critical["succeeded_per_min"] == 120.0
    assert report["dlq"] == {"depth": 0, "evictions": 4}


def test_dlq_groups_are_shown_in_the_order_dlq_stats_gives_largest_first() -> None:
    report = build_report(FakeRuntime(), snapshot(reading("standard"), dlq_depth=11))  # type: ignore[arg-type]
    assert [g["fingerprint"] for g in report["dlq"]["top"]] == ["bbb", "aaa"]
    text = render_text(report)
    assert text.index("bbb") < text.index("aaa")
    assert "DLQ: 11 record(s), 4 evicted by retention" in text


def test_text_flags_the_late_tier_and_says_when_no_worker_serves_it() -> None:
    report = build_report(FakeRuntime(), snapshot(  # type: ignore[arg-type]
        reading("critical", depth=3, oldest_age_s=9.0, slo_s=5.0, workers_online=0),
        reading("standard", depth=1, oldest_age_s=1.0)))
    text = render_text(report)
    critical_row = next(line for line in text.splitlines() if line.startswith("critical"))
    assert critical_row.endswith("LATE")
    assert "LATE: critical: oldest message 9.0s > slo 5.0s (no worker online)" in text
    assert "standard" in text
    assert "LATE: standard" not in text


def test_a_queue_not_declared_yet_reads_as_empty_and_says_so() -> None:
    report = build_report(FakeRuntime(), snapshot(  # type: ignore[arg-type]
        reading("critical", declared=False), reading("standard")))
    assert [(t["depth"], t["declared"]) for t in report["tiers"]] == [(0, False), (0, True)]
    rows = render_text(report).splitlines()
    assert rows[1].endswith("(queue not declared yet)")
    assert "not declared" not in rows[2]


def test_oldest_age_takes_the_oldest_stamp_over_the_priority_sub_lists() -> None:
    now = 1000.0
    answers = ["2 990.5", "0 -", "1 900.25", "3 -"]  # "-": a message without the header
    assert oldest_age(answers, now) == 99.75
    assert oldest_age(["0 -", "0 -"], now) is None


def test_slo_defaults_per_built_in_tier_and_for_a_declared_tier() -> None:
    settings = load_settings()
    assert {t: settings.tier(t).slo_s for t in settings.tiers} == {
        "critical": 5.0, "high": 30.0, "standard": 120.0, "bulk": 3600.0}
    assert TierConfig().slo_s == 300.0
    with pytest.raises(ValueError, match="slo_s"):
        TierConfig(slo_s=0)
