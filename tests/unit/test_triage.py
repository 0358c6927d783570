"""Fingerprints, filters and stats of dead-letter records (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.core.retry import Reason
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.triage import (
    RecordFilter,
    fingerprint,
    group_by_fingerprint,
    normalise_message,
    record_fingerprint,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def record(n: int = 0, **overrides: object) -> DeadLetterRecord:
    fields: dict[str, object] = {
        "id": f"r{n}", "event": {"id": f"e{n}", "type": "reward.granted", "source": "s"},
        "tier": "critical", "handler": "rewards.credit", "reason": Reason.RETRIES_EXHAUSTED,
        "attempts": 3, "exception": "httpx.ReadTimeout",
        "message": f"timed out after {n}ms for user 9f1c2e3d-1111-4222-8333-444455556666",
        "traceback": "", "first_failed_at": T0 + timedelta(minutes=n),
        "last_failed_at": T0 + timedelta(minutes=n + 1), "worker": "w", "task_id": "t",
        "queue": "critical"}
    fields.update(overrides)
    return DeadLetterRecord.model_validate(fields)


def test_numbers_ids_and_hex_are_normalised_away() -> None:
    text = ("order 12345 of user 9f1c2e3d-1111-4222-8333-444455556666 at 0xdeadbeef "
            "token abcdef0123456789 schema v53 at 2026-11-29T10:00:00Z")
    assert normalise_message(text) == ("order <n> of user <uuid> at <hex> token <hex> "
                                       "schema v<n> at <time>")


def test_same_cause_with_different_numbers_shares_a_fingerprint() -> None:
    assert record_fingerprint(record(1)) == record_fingerprint(record(2))


def test_handler_or_exception_class_changes_the_fingerprint() -> None:
    base = fingerprint("h", "E", "boom")
    assert fingerprint("h2", "E", "boom") != base
    assert fingerprint("h", "F", "boom") != base


def test_stats_group_causes_largest_first_with_tiers_and_time_span() -> None:
    records = [record(n) for n in range(5)] + [
        record(9, exception="KeyError", message="'x'", tier="bulk")]
    stats = group_by_fingerprint(records)
    assert [s.count for s in stats] == [5, 1]
    assert stats[0].first_seen == T0
    assert stats[0].last_seen == T0 + timedelta(minutes=5)
    assert stats[1].tiers == {"bulk"}


def test_filter_matches_on_each_criterion() -> None:
    r = record(3)
    assert RecordFilter().matches(r)
    assert RecordFilter(ids=frozenset({"e3"})).matches(r)  # an event id selects too
    assert not RecordFilter(ids=frozenset({"e4"})).matches(r)
    assert RecordFilter(exception="ReadTimeout").matches(r)  # suffix of the dotted name
    assert not RecordFilter(exception="Timeout").matches(r)
    assert RecordFilter(type="reward.granted", tier="critical", reason="retries_exhausted",
                        handler="rewards.credit").matches(r)
    assert RecordFilter(fingerprint=record_fingerprint(r)[:6]).matches(r)
    assert RecordFilter(since=T0 + timedelta(minutes=4)).matches(r)
    assert not RecordFilter(until=T0 + timedelta(minutes=4)).matches(r)


def test_empty_filter_selects_all_and_describes_itself_so() -> None:
    assert RecordFilter().selects_all
    assert RecordFilter().describe() == {"all": True}
    assert RecordFilter(tier="bulk").describe() == {"tier": "bulk"}
