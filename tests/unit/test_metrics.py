"""Metric recording that needs no broker: outcome mapping, publish counters, rates."""

from __future__ import annotations

import time

import pytest
from celery.exceptions import Reject, Retry, TimeLimitExceeded

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.observe import metrics
from pipeline.observe import outcomes as rates_module
from pipeline.observe.outcomes import (
    FLUSH_EVERY_S,
    OutcomeRates,
    minute_of,
    per_minute,
    rate_key,
    window_keys,
)
from pipeline.producer import counts as ingestcounts
from pipeline.producer.results import PublishResult
from pipeline.worker.runtime import runtime_for
from pipeline.worker.taskstate import DeadLettered, Deferred, RetryScheduled


@pytest.mark.parametrize(("retval", "state", "expected"), [
    ("succeeded", "SUCCESS", ("succeeded", None)),
    ("retry_scheduled", "SUCCESS", ("retried", None)),
    ("dead_lettered:permanent_error", "SUCCESS", ("dead_lettered", "permanent_error")),
    ("dead_lettered:max_deliveries", "SUCCESS", ("dead_lettered", "max_deliveries")),
    ("already_done", "SUCCESS", ("already_done", None)),
    ("fanned_out", "SUCCESS", ("fanned_out", None)),
    ("deferred:retry_budget", "SUCCESS", ("deferred", None)),
    ("deferred:breaker_open:payments-api", "SUCCESS", ("deferred", None)),
    (None, "REJECTED", ("failed", None)),
    ("succeeded", "FAILURE", ("failed", None)),
    ("something new", "SUCCESS", ("failed", None)),
    (Retry(exc=RetryScheduled("...", "retry_scheduled", 1.0)), "RETRY", ("retried", None)),
    (Retry(exc=Deferred("...", "deferred:requested", 1.0)), "RETRY", ("deferred", None)),
    (Retry(exc=Deferred("...", "rechecked", 1.0)), "RETRY", ("rechecked", None)),
    (DeadLettered("...", "dead_lettered:invalid_payload"), "FAILURE",
     ("dead_lettered", "invalid_payload")),
    (Reject("state store down", requeue=True), "REJECTED", ("failed", None)),
    (ValueError("not ours"), "FAILURE", ("failed", None)),
    (Retry(exc=ValueError("not ours")), "RETRY", ("failed", None)),
])
def test_task_return_value_or_raised_state_maps_to_the_outcome_label(
    retval: object, state: str, expected: tuple[str, str | None]
) -> None:
    assert metrics.task_outcome(retval, state) == expected


def test_hard_time_limit_counts_as_retried_until_retries_run_out() -> None:
    settings = load_settings(broker_url="redis://127.0.0.1:1/0")
    rt = runtime_for(create_app(settings, main="metrics-timeout"))
    limit = settings.tier("critical").max_retries
    exc = TimeLimitExceeded(15)

    def outcome(attempt: int, settled: bool = True) -> tuple[str, str | None]:
        return metrics.timeout_outcome(exc, settled=settled, attempt=attempt, runtime=rt,
                                       tier="critical")

    assert outcome(1) == ("retried", None)
    assert outcome(limit) == ("retried", None)
    assert outcome(limit + 1) == ("dead_lettered", "retries_exhausted")
    assert outcome(1, settled=False) == ("failed", None)


def test_publish_results_are_counted_by_tier_type_outcome_and_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingestcounts, "_types_seen", set())
    counts = ingestcounts.tally([
        PublishResult(id="1", tier="critical", type="unit.counted"),
        PublishResult(id="2", tier="critical", type="unit.counted"),
        PublishResult(id="1", tier="critical", type="unit.counted", outcome="duplicate"),
        PublishResult(id=None, tier=None, outcome="rejected", reason="invalid"),
        PublishResult(id="3", tier="bulk", type="unit.counted", outcome="rejected",
                      reason="tier_full"),
    ])
    assert counts == {("critical", "unit.counted", "accepted", ""): 2,
                      ("critical", "unit.counted", "duplicate", ""): 1,
                      ("", "", "rejected", "invalid"): 1,
                      ("bulk", "unit.counted", "rejected", "tier_full"): 1}


def test_event_types_past_the_label_limit_are_counted_as_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingestcounts, "_types_seen", {"seen.before"})
    monkeypatch.setattr(ingestcounts, "TYPE_LABELS_MAX", 1)
    counts = ingestcounts.tally([PublishResult(id="1", tier="standard", type="brand.new"),
                                 PublishResult(id="2", tier="standard", type="seen.before")])
    assert counts == {("standard", ingestcounts.OTHER_TYPE, "accepted", ""): 1,
                      ("standard", "seen.before", "accepted", ""): 1}


def test_counters_read_back_from_the_hash_fields_they_were_written_to() -> None:
    raw = {b"bulk|demo.ok|accepted|": b"7", b"||rejected|invalid": b"2", b"junk": b"1"}
    assert dict(ingestcounts.read(raw)) == {("bulk", "demo.ok", "accepted", ""): 7,
                                            ("", "", "rejected", "invalid"): 2}



def test_sliding_rate_weighs_the_previous_minute_by_what_is_left_of_this_one() -> None:
    start = 600.0 * 60  # a minute boundary
    assert per_minute(current=0, previous=60, now=start) == 60
    assert per_minute(current=30, previous=60, now=start + 30) == 60
    assert per_minute(current=60, previous=60, now=start + 59.999) == pytest.approx(60, abs=0.01)
    assert per_minute(current=0, previous=0, now=start + 10) == 0


def test_rate_keys_name_tier_outcome_and_minute() -> None:
    now = 1_800_000_030.0
    assert minute_of(now) == 30_000_000
    assert rate_key("bulk", "failed", 7) == "pipeline:stats:bulk:failed:7"
    assert window_keys("bulk", "failed", now) == ("pipeline:stats:bulk:failed:30000000",
                                                  "pipeline:stats:bulk:failed:29999999")


def test_a_batch_result_counts_each_event_under_its_own_outcome() -> None:
    from pipeline.worker.batch import batch_outcomes

    retval = "batch:succeeded=97;retry_scheduled=2;dead_lettered:retries_exhausted=1"
    pairs = batch_outcomes(retval)
    assert pairs == [("succeeded", 97), ("retry_scheduled", 2),
                     ("dead_lettered:retries_exhausted", 1)]
    assert [metrics.task_outcome(r, "SUCCESS") for r, _ in pairs] == [
        ("succeeded", None), ("retried", None), ("dead_lettered", "retries_exhausted")]



class RecordingClient:
    """A redis client stand-in that records what the flushes wrote."""

    def __init__(self) -> None:
        self.written: dict[str, int] = {}

    def pipeline(self, transaction: bool = False) -> RecordingClient:
        return self

    def incrby(self, key: str, n: int) -> None:
        self.written[key] = self.written.get(key, 0) + n

    def expire(self, key: str, ttl_s: int) -> None:
        pass

    def execute(self) -> None:
        pass


def test_counts_an_idle_process_buffered_are_written_by_the_timer() -> None:
    rates_module._buffers.clear()  # this process's buffer, as a fresh pool process has it
    client = RecordingClient()
    rates = OutcomeRates(client)  # type: ignore[arg-type]
    rates.incr("critical", "succeeded")  # the first count is written at once
    for _ in range(29):
        rates.incr("critical", "succeeded")  # then buffered: the process goes idle
    assert sum(client.written.values()) == 1
    deadline = time.monotonic() + FLUSH_EVERY_S * 3
    while sum(client.written.values()) < 30 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(client.written.values()) == 30
