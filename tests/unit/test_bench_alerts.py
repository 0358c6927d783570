"""bench.alerts: scrapes become promtool input series; promtool's answer says which
of the shipped alert rules were pending and firing, and when."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.alerts import (
    Recorder,
    evaluate,
    max_for_s,
    parse_got,
    rule_metric_names,
    values_notation,
)

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed")


def scrape_text(breaker_state: int) -> str:
    return (
        "# TYPE pipeline_broker_up gauge\npipeline_broker_up 1.0\n"
        "# TYPE pipeline_breaker_state gauge\n"
        f'pipeline_breaker_state{{downstream="partner-api"}} {breaker_state}.0\n'
        "# TYPE pipeline_workers_online gauge\n"
        'pipeline_workers_online{tier="critical"} 1.0\n'
        "# TYPE unrelated_metric gauge\nunrelated_metric 5.0\n"
    )


def test_rule_metric_names_are_read_from_the_alert_expressions() -> None:
    names = rule_metric_names()
    assert {"pipeline_breaker_state", "pipeline_broker_up", "pipeline_dlq_depth"} <= names
    assert not any(n.startswith("up") for n in names)


def test_longest_for_duration_is_in_seconds() -> None:
    assert max_for_s() == 15 * 60  # PipelineDLQGrowing: for 15m


def test_recorder_keeps_only_series_the_rules_read() -> None:
    rec = Recorder(5.0)
    rec.add(scrape_text(0))
    rec.add(scrape_text(2))
    assert rec.steps == 2
    assert rec.series['pipeline_breaker_state{downstream="partner-api"}'] == {0: 0.0, 1: 2.0}
    assert not any(k.startswith("unrelated") for k in rec.series)


def test_values_notation_marks_missing_scrapes_and_nan() -> None:
    assert values_notation({0: 1.0, 2: float("nan"), 3: 0.5}, 5) == "1.0 _ NaN 0.5 _"


def test_parse_got_reads_labels_and_values_per_expression() -> None:
    output = (
        "  FAILED:\n"
        '    expr: "min_over_time(timestamp(ALERTS{alertstate=\\"firing\\"})[70s:5s])", '
        "time: 1m10s,\n"
        "        exp: nil\n"
        '        got: {alertname="Up0", alertstate="firing", tier="bulk"} 3E+01, '
        '{alertname="B", alertstate="firing"} 2.5E+01\n'
    )
    got = parse_got(output)
    assert got == {'min_over_time(timestamp(ALERTS{alertstate="firing"})[70s:5s])': [
        ({"alertname": "Up0", "alertstate": "firing", "tier": "bulk"}, 30.0),
        ({"alertname": "B", "alertstate": "firing"}, 25.0)]}


@needs_promtool
def test_a_breaker_open_past_its_for_duration_fires_and_a_short_one_only_pends(
    tmp_path: Path,
) -> None:
    rec = Recorder(10.0)
    # open from 100 s to 300 s (past PipelineBreakerOpen's for: 2m), closed otherwise
    for step in range(40):
        rec.add(scrape_text(2 if 10 <= step < 30 else 0))
    found = evaluate(rec, tmp_path)
    assert found["evaluated"]
    (alert,) = [a for a in found["alerts"] if a["alertname"] == "PipelineBreakerOpen"]
    assert alert["labels"]["downstream"] == "partner-api"
    assert alert["pending"] == [100.0, 210.0]
    assert alert["firing"] == [220.0, 290.0]

    short = Recorder(10.0)
    for step in range(40):
        short.add(scrape_text(2 if 10 <= step < 16 else 0))
    (alert,) = [a for a in evaluate(short, tmp_path)["alerts"]
                if a["alertname"] == "PipelineBreakerOpen"]
    assert alert["firing"] is None
    assert alert["pending"] == [100.0, 150.0]
