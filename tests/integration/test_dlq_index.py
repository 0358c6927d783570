"""The DLQ index stays the records' own: after dead letters written by real workers, a
replay, a purge, retention, a rebuild, and a DLQ written without it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.dlq.index import DlqIndex
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import (
    FingerprintStat,
    RecordFilter,
    group_by_fingerprint,
    record_fingerprint,
)
from pipeline.worker.runtime import Runtime
from tests.integration.support import Stack, wait_for, write_config

MAX_RECORDS = 40  # the test's dlq_max_records, so retention evicts
BATCHED = """
[tiers.batched]
batch_size = 10
max_retries = 0
retry_budget_ratio = 0
prefetch_multiplier = 2
soft_time_limit_s = 4
time_limit_s = 5
"""  # a dead letter in a batch is written by the settle step that also begins the next


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dlqindex")
    config = write_config(tmp / "pipeline.toml", extra=BATCHED)
    config.write_text(f"dlq_max_records = {MAX_RECORDS}\n" + config.read_text())
    s = Stack(redis_url, config, tmp)
    try:
        yield s
    finally:
        s.stop()


def index_of(rt: Runtime) -> DlqIndex:
    assert rt.dlq.index is not None
    return rt.dlq.index


def view(stats: list[FingerprintStat]) -> list[dict[str, Any]]:
    return [{**s.as_dict(), "per_hour": dict(s.per_hour)} for s in stats]


def dump(stack: Stack, index: DlqIndex) -> dict[bytes, object]:
    """Every index key's content."""
    out: dict[bytes, object] = {}
    r = stack.state
    for key in r.scan_iter(match=index.prefix + "*"):
        kind = r.type(key)
        out[key] = (r.zrange(key, 0, -1, withscores=True) if kind == b"zset" else
                    r.hgetall(key) if kind == b"hash" else
                    r.smembers(key) if kind == b"set" else r.get(key))
    return out


def assert_index_answers_as_the_records(rt: Runtime) -> None:
    """Every indexed answer equals the same answer computed from all the records."""
    records = rt.dlq.records()
    assert view(rt.dlq.query.groups()) == view(group_by_fingerprint(records))
    filters = [RecordFilter(fingerprint=record_fingerprint(r)) for r in records]
    filters += [RecordFilter(tier=r.tier, handler=r.handler) for r in records]
    filters += [RecordFilter(reason=r.reason.value, exception=r.exception.rsplit(".")[-1])
                for r in records]
    middle = records[len(records) // 2]  # its own failure time is an edge of either range
    filters += [RecordFilter(since=middle.last_failed_at, type=middle.event.get("type")),
                RecordFilter(until=middle.last_failed_at),
                RecordFilter(ids=frozenset({middle.id, records[0].event_id}))]
    for flt in filters:
        expected = [r for r in records if flt.matches(r)]
        count, listed = rt.dlq.query.select(flt)
        assert (count, [r.id for r in listed]) == (len(expected), [r.id for r in expected])
        assert rt.dlq.query.select(flt, 2) == (len(expected), expected[:2])
        assert view(rt.dlq.query.groups(flt)) == view(group_by_fingerprint(expected))
    for r in records[:5]:
        assert rt.dlq.query.find(r.id, 5) == (1, [r])
    assert index_of(rt).state() == "ok"


def test_index_follows_dead_letters_replay_purge_retention_and_rebuild(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.dlq.index.FETCH_MAX", 3)  # reads span several scripts
    rt = stack.rt
    index = index_of(rt)
    assert index.rebuild() == 0  # an empty DLQ's index, marked usable
    stack.start_workers("standard", "critical", "batched")
    ids = [stack.publish("demo.invalid").id for _ in range(8)]
    batch = [{"type": "demo.invalid", "source": "tests", "tier": "batched"} for _ in range(5)]
    ids += [r.id for r in rt.publisher.publish_many(batch)]
    ids += [stack.publish("demo.typed", payload={"n": "not a number"}).id for _ in range(6)]
    ids += [stack.publish("nobody.handles.this").id for _ in range(4)]
    wait_for(lambda: rt.dlq.depth() >= len(ids), 60, f"{len(ids)} dead letters")
    stack.stop()  # from here on nothing consumes: every change below is the test's
    assert index.state() == "ok"  # the settle steps indexed what they wrote: no rebuild
    written = dump(stack, index)
    assert index.rebuild() == len(ids)
    assert dump(stack, index) == written  # the same index, key for key, from the records
    assert len(rt.dlq.query.groups()) == 3
    assert_index_answers_as_the_records(rt)

    invalid = RecordFilter(handler="demo.invalid")
    summary = Replayer(rt).replay(invalid, by="test", validate=False)
    assert summary.replayed == 13
    assert index.state() == "ok"
    assert rt.dlq.query.select(invalid) == (0, [])
    assert_index_answers_as_the_records(rt)

    purged = Replayer(rt).purge(RecordFilter(reason="no_handler"), by="test")
    assert purged == 4
    assert index.state() == "ok"
    assert_index_answers_as_the_records(rt)

    (template,) = rt.dlq.records(1)
    for n in range(MAX_RECORDS + 5 - rt.dlq.depth()):
        rt.dlq.put(template.model_copy(update={"id": f"filler-{n}", "tier": "bulk"}))
    assert rt.dlq.depth() == MAX_RECORDS
    assert index.state() == "ok"  # evicted entries left the index with the list
    assert_index_answers_as_the_records(rt)

    before = view(rt.dlq.query.groups())
    for key in stack.state.scan_iter(match=index.prefix + "*"):
        stack.state.delete(key)  # a DLQ written by a version without the index
    assert index.state() == "missing"
    assert view(rt.dlq.query.groups()) == before  # rebuilt on the first read
    assert index.state() == "ok"
    assert_index_answers_as_the_records(rt)


def test_an_entry_written_without_the_index_is_never_hidden(stack: Stack) -> None:
    rt = stack.rt
    index = index_of(rt)
    index.rebuild()
    (template,) = rt.dlq.records(1)
    stranger = template.model_copy(update={"id": "written-by-an-old-version"})
    key, raw = rt.dlq.render(stranger)
    stack.state.lpush(key, raw)  # no index entry, as a previous version would write it
    assert index.state() == "count"
    stack.state.set(index.key("lock"), "1")  # another process is rebuilding: we cannot
    try:
        assert rt.dlq.query.select(RecordFilter(ids=frozenset({stranger.id})))[0] == 1
        assert rt.dlq.query.find(stranger.id, 1) == (1, [stranger])
        total = sum(g.count for g in rt.dlq.query.groups())
        assert total == rt.dlq.depth()
    finally:
        stack.state.delete(index.key("lock"))
    assert rt.dlq.query.find(stranger.id, 1) == (1, [stranger])  # rebuilt this time
    assert index.state() == "ok"
    assert_index_answers_as_the_records(rt)


def test_an_entry_that_is_not_the_indexed_one_is_not_believed(stack: Stack) -> None:
    rt = stack.rt
    index = index_of(rt)
    index.rebuild()
    _, newer = rt.dlq.records(2)
    # the list rewritten behind the index's back: same length, same ends, another record
    _, raw = rt.dlq.render(newer.model_copy(update={"id": "swapped-in"}))
    stack.state.lset(rt.dlq.queue.name, -2, raw)  # type: ignore[arg-type]  # typed str, takes bytes
    assert rt.dlq.depth() >= 3
    assert index.state() == "ok"
    assert rt.dlq.query.find(newer.id, 1) == (0, [])  # read, hash refused, answered by a scan
    assert index.state() == "missing"  # and the index is marked for a rebuild
    count, found = rt.dlq.query.find("swapped-in", 1)
    assert (count, [r.id for r in found]) == (1, ["swapped-in"])
    assert index.state() == "ok"
    assert_index_answers_as_the_records(rt)


def reindex(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "dlq", "reindex", *args],
                          capture_output=True, text=True, env=stack.env(), timeout=120)


def test_reindex_check_finds_what_readers_cannot_and_reindex_repairs_it(stack: Stack) -> None:
    rt = stack.rt
    index = index_of(rt)
    index.rebuild()
    assert reindex(stack, "--check").returncode == 0
    _, newer = rt.dlq.records(2)
    _, raw = rt.dlq.render(newer.model_copy(update={"id": "rewritten"}))
    # the cheap check cannot see this one
    stack.state.lset(rt.dlq.queue.name, -2, raw)  # type: ignore[arg-type]  # typed str, takes bytes
    assert index.state() == "ok"
    checked = reindex(stack, "--check")
    assert checked.returncode == 1, checked.stdout + checked.stderr
    rebuilt = reindex(stack)
    assert rebuilt.returncode == 0
    assert f"indexed {rt.dlq.depth()} record(s)" in rebuilt.stdout
    assert reindex(stack, "--check").returncode == 0
    assert_index_answers_as_the_records(rt)
