"""The DLQ index's pure parts: what it keeps of a record, and filters and stats on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from pipeline.core.retry import Reason
from pipeline.dlq.index import entry_meta
from pipeline.dlq.query import group_matches, meta_matches, record_level, stats_of_metas
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.triage import RecordFilter, group_by_fingerprint

T0 = datetime(2026, 11, 30, 12, 34, 56, 789_012, tzinfo=UTC)


def record(n: int, **changes: object) -> DeadLetterRecord:
    base = DeadLetterRecord(
        id=f"rec-{n}", event={"id": f"Ev-{n}", "type": "game.update", "payload": {"n": n}},
        tier="standard", handler="game.update", reason=Reason.RETRIES_EXHAUSTED, attempts=3,
        exception="httpx.ReadTimeout", message=f"timed out after {n}ms", traceback="",
        first_failed_at=T0 - timedelta(hours=n), last_failed_at=T0 + timedelta(minutes=n),
        worker="w", task_id=f"t-{n}", queue="standard")
    return base.model_copy(update=changes)


def meta(r: DeadLetterRecord) -> list[str]:
    return list(orjson.loads(entry_meta(r, r.id.encode())[0]))


def test_meta_filters_answer_as_the_record_filter() -> None:
    records = [record(n, tier=("bulk", "standard")[n % 2],
                      reason=(Reason.PERMANENT_ERROR, Reason.EXPIRED)[n % 2]) for n in range(6)]
    filters = [RecordFilter(tier="bulk"), RecordFilter(reason="expired", type="game.update"),
               RecordFilter(type="other"), RecordFilter(since=records[2].last_failed_at),
               RecordFilter(until=records[2].last_failed_at),
               RecordFilter(ids=frozenset({"rec-1", "Ev-4"}))]
    for flt in filters:
        assert [meta_matches(meta(r), flt) for r in records] == [flt.matches(r) for r in records]


def test_group_filters_match_handler_exact_and_exception_by_suffix() -> None:
    info = {"handler": "game.update", "exception": "httpx.ReadTimeout"}
    assert group_matches("abc123", info, RecordFilter(exception="ReadTimeout"))
    assert group_matches("abc123", info, RecordFilter(fingerprint="abc", handler="game.update"))
    assert not group_matches("abc123", info, RecordFilter(exception="Timeout"))
    assert not group_matches("abc123", info, RecordFilter(fingerprint="abd"))


def test_only_ids_tier_type_reason_and_times_are_record_level() -> None:
    assert not record_level(RecordFilter(fingerprint="a", handler="h", exception="E"))
    assert record_level(RecordFilter(tier="bulk"))
    assert record_level(RecordFilter(since=T0))


def test_stats_from_metas_equal_stats_from_records() -> None:
    records = [record(n, tier=("bulk", "standard")[n % 2]) for n in range(5)]
    records.append(record(9, handler="other", exception="builtins.KeyError", message="'k'"))
    metas = [meta(r) for r in records]
    infos = {m[2]: {"handler": r.handler, "exception": r.exception,
                    "message": group_by_fingerprint([r])[0].message}
             for m, r in zip(metas, records, strict=True)}
    got = stats_of_metas(metas, infos)
    want = group_by_fingerprint(records)
    assert [(s.as_dict(), s.per_hour) for s in got] == [(s.as_dict(), s.per_hour) for s in want]
