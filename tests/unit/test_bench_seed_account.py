"""bench.seed.account: every sent event gets one outcome; lost means gone for good."""

from __future__ import annotations

import pytest

from bench.seed.account import Observed, Sent, counter_totals, describe_runs, summarize

T0 = 1000.0
OUTAGE = (T0 + 10, T0 + 20)


def sent() -> list[Sent]:
    return [Sent("a", "reward", T0 + 1), Sent("b", "reward", T0 + 12),
            Sent("c", "analytics", T0 + 2), Sent("d", "analytics", T0 + 25),
            Sent("e", "analytics", T0 + 26)]


def test_outcomes_lost_and_duplicates_per_class() -> None:
    seen = Observed(delivered={"a": T0 + 1.5, "b": T0 + 22.0, "c": T0 + 3.0},
                    effects={"a": 1, "b": 2, "c": 1}, calls={"a": 1, "b": 3, "c": 1, "d": 4},
                    dead_lettered={"d"}, failed_logged={"e"})
    out = summarize(sent(), seen, t0=T0, outage=OUTAGE, bucket_s=5.0)
    reward, analytics, every = out["reward"], out["analytics"], out["all"]
    assert (reward["delivered"], reward["lost"], reward["duplicates"]) == (2, 0, 1)
    assert (analytics["delivered"], analytics["dead_lettered"], analytics["failed_logged"],
            analytics["lost"]) == (1, 1, 1, 1)
    assert every["sent"] == 5
    assert every["pct"]["lost"] == pytest.approx(20.0)
    assert every["not_delivered_pct"] == pytest.approx(40.0)
    assert analytics["calls_per_event"]["max"] == 4
    assert reward["calls_per_event"]["mean"] == pytest.approx(2.0)


def test_latency_outside_the_outage_leaves_out_events_sent_during_it() -> None:
    seen = Observed(delivered={"a": T0 + 1.5, "b": T0 + 22.0})
    reward = summarize(sent()[:2], seen, t0=T0, outage=OUTAGE, bucket_s=5.0)["reward"]
    assert reward["latency_s"]["max"] == pytest.approx(10.0)
    assert reward["latency_s_outside_outage"]["n"] == 1
    assert reward["latency_s_outside_outage"]["p99"] == pytest.approx(0.5)
    assert [row[0] for row in reward["timeline"]] == [0.0, 10.0]


def test_events_still_held_by_the_broker_are_unsettled_not_lost() -> None:
    held = summarize(sent(), Observed(broker_holds=3), t0=T0, outage=OUTAGE, bucket_s=5.0)
    assert (held["all"]["unsettled"], held["all"]["lost"]) == (5, 0)
    gone = summarize(sent(), Observed(broker_holds=0), t0=T0, outage=OUTAGE, bucket_s=5.0)
    assert gone["all"]["lost"] == 5


def test_counter_totals_sum_runs_by_outcome_over_every_tier_and_handler() -> None:
    scrape = (
        "# HELP pipeline_tasks_total Settled pipeline.handle attempts, by outcome.\n"
        "# TYPE pipeline_tasks_total counter\n"
        'pipeline_tasks_total{tier="critical",handler="h",outcome="succeeded"} 5.0\n'
        'pipeline_tasks_total{tier="bulk",handler="h",outcome="succeeded"} 7.0\n'
        'pipeline_tasks_total{tier="bulk",handler="h",outcome="deferred"} 30.0\n'
        "# TYPE pipeline_other_total counter\n"
        'pipeline_other_total{outcome="succeeded"} 99.0\n'
    )
    assert counter_totals(scrape, "pipeline_tasks_total", "outcome") == {
        "deferred": 30, "succeeded": 12}


def test_describe_runs_names_outcomes_and_refusals_and_is_empty_without_metrics() -> None:
    side = {"runs": {"deferred": 1200, "succeeded": 12}, "budget_refusals": {"bulk": 3}}
    assert describe_runs(side) == ("handler runs by outcome: deferred 1,200, succeeded 12; "
                                   "retries over the budget (deferred): bulk 3")
    assert describe_runs({"calls": 5}) == ""
