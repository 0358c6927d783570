"""DLQ operations against real workers: inspect, group, replay, purge, retention."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import cast

import pytest

from pipeline.core.state import Keys
from pipeline.demo import fixed_key
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from tests.integration.support import Stack, wait_for, write_config

RETENTION = "dlq_max_records = 400\n"


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("dlqops")
    config = write_config(tmp / "pipeline.toml")
    config.write_text(RETENTION + config.read_text())
    s = Stack(redis_url, config, tmp)
    try:
        s.start_workers("standard", "critical")
        yield s
    finally:
        s.stop()


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "dlq", *args], capture_output=True,
                          text=True, env=stack.env(), timeout=120)


def dead(stack: Stack, ids: list[str], timeout_s: float = 60) -> None:
    wanted = set(ids)
    wait_for(lambda: wanted <= {r.event_id for r in stack.rt.dlq.iter_records()}, timeout_s,
             f"{len(ids)} records in the DLQ")


def test_fixed_handler_replay_by_fingerprint_processes_all_hundred_once(stack: Stack) -> None:
    stack.state.delete(fixed_key("demo.fail"))
    ids = [stack.publish("demo.fail").id for _ in range(100)]
    dead(stack, [i for i in ids if i])
    stats = json.loads(cli(stack, "stats", "--handler", "demo.fail", "--json").stdout)
    assert len(stats) == 1  # "attempt 3" normalised: one cause, not a hundred
    assert stats[0]["count"] >= 100
    fp = stats[0]["fingerprint"]

    stack.state.set(fixed_key("demo.fail"), "1")  # the fix is deployed
    try:
        proc = cli(stack, "replay", "--fingerprint", fp, "--json")
        assert proc.returncode == 0, proc.stderr
        summary = json.loads(proc.stdout)
        assert summary["replayed"] >= 100
        for event_id in ids:
            assert event_id is not None
            stack.wait_effect(event_id, timeout_s=30)
        time.sleep(0.5)
        assert all(stack.effects(i) == 1 for i in ids if i)
        assert not {r.event_id for r in stack.rt.dlq.iter_records()} & set(ids)
    finally:
        stack.state.delete(fixed_key("demo.fail"))


def test_replaying_work_that_already_succeeded_elsewhere_does_not_run_it_again(
    stack: Stack,
) -> None:
    result = stack.publish("demo.fail")
    assert result.id is not None
    dead(stack, [result.id])
    stack.state.set(fixed_key("demo.fail"), "1")
    try:
        event = stack.rt.publisher.validate({"id": result.id, "type": "demo.fail",
                                             "source": "tests"})
        stack.rt.publisher.enqueue(event, "standard", [])  # succeeds via the worker's fan-out
        stack.wait_effect(result.id)
        summary = Replayer(stack.rt).replay(RecordFilter(ids=frozenset({result.id})), by="test")
        assert summary.replayed == 1
        time.sleep(1.5)
        assert stack.effects(result.id) == 1
    finally:
        stack.state.delete(fixed_key("demo.fail"))


def test_dry_run_changes_nothing_and_is_audited(stack: Stack) -> None:
    result = stack.publish("demo.invalid")
    assert result.id is not None
    dead(stack, [result.id])
    before = stack.rt.dlq.depth()
    proc = cli(stack, "replay", result.id, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["matched"] == 1
    assert stack.rt.dlq.depth() == before
    audit = json.loads(cli(stack, "audit", "--json", "--limit", "1").stdout)[0]
    assert audit["action"] == "replay"
    assert audit["dry_run"] is True
    assert audit["by"].startswith("os:")
    assert audit["filter"]["ids"] == [result.id]


def test_record_that_would_fail_again_is_reported_and_kept_unless_forced(stack: Stack) -> None:
    result = stack.publish("demo.typed", payload={"user_id": "nope", "amount": 1})
    assert result.id is not None
    dead(stack, [result.id])
    summary = json.loads(cli(stack, "replay", result.id, "--json").stdout)
    assert summary["would_fail"] == 1
    assert summary["replayed"] == 0
    assert "user_id" in summary["would_fail_records"][0]["error"]
    assert stack.dlq_for(result.id)
    forced = json.loads(cli(stack, "replay", result.id, "--force", "--json").stdout)
    assert forced["replayed"] == 1
    wait_for(lambda: len(stack.dlq_for(cast(str, result.id))) == 1, 20, "it to fail again")


def test_replay_to_another_tier_runs_there(stack: Stack) -> None:
    result = stack.publish("demo.fail")
    assert result.id is not None
    dead(stack, [result.id])
    stack.state.set(fixed_key("demo.fail"), "1")
    try:
        summary = Replayer(stack.rt).replay(RecordFilter(ids=frozenset({result.id})),
                                            by="test", to_tier="critical")
        assert summary.replayed == 1
        stack.wait_effect(result.id)
        log = "".join(w.log() for w in stack.workers if w.tier == "critical")
        assert result.task_ids[0] in log
    finally:
        stack.state.delete(fixed_key("demo.fail"))


def test_list_filters_show_and_purge(stack: Stack) -> None:
    marker = f"purge-{uuid.uuid4().hex[:6]}"
    ids = [stack.publish("demo.invalid", source=marker).id for _ in range(3)]
    dead(stack, [i for i in ids if i])
    listed = json.loads(cli(stack, "list", "--reason", "permanent_error", "--json").stdout)
    assert {r["event"]["id"] for r in listed} >= set(ids)
    assert all(r["reason"] == "permanent_error" for r in listed)
    shown = cli(stack, "show", str(ids[0]))
    assert shown.returncode == 0
    assert "Traceback" in shown.stdout
    assert "fingerprint" in shown.stdout
    refused = cli(stack, "purge", *[str(i) for i in ids])
    assert refused.returncode == 2  # --yes is required
    purged = cli(stack, "purge", *[str(i) for i in ids], "--yes")
    assert purged.stdout.strip() == "purged 3 record(s)"
    assert not any(stack.dlq_for(str(i)) for i in ids)


def test_retention_evicts_the_oldest_counts_and_logs_them(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    seed = stack.publish("demo.invalid").id
    assert seed is not None
    record = stack.wait_dlq(seed)
    before = int(stack.state.get(Keys.dlq_evictions()) or 0)
    for n in range(405 - stack.rt.dlq.depth()):
        stack.rt.dlq.put(record.model_copy(update={"id": f"filler-{n}"}))
    assert stack.rt.dlq.depth() == 400
    assert int(stack.state.get(Keys.dlq_evictions()) or 0) - before >= 5
    evictions = [r.message for r in caplog.records if "retention evicted" in r.message]
    assert len(evictions) >= 5
    assert record_fingerprint(record) in evictions[0]


def test_http_replay_is_audited_with_the_token_name(stack: Stack) -> None:
    from fastapi.testclient import TestClient

    from pipeline.http.api import create_api

    result = stack.publish("demo.fail")
    assert result.id is not None
    dead(stack, [result.id])
    stack.state.set(fixed_key("demo.fail"), "1")
    try:
        api = create_api(stack.rt, token=None, tokens={"ops": "ops-secret-0123456789"})
        with TestClient(api) as client:
            auth = {"Authorization": "Bearer ops-secret-0123456789"}
            assert client.get("/dlq", params={"handler": "demo.fail"}).status_code == 401
            listed = client.get("/dlq", params={"handler": "demo.fail"}, headers=auth).json()
            assert result.id in {r["event"]["id"] for r in listed}
            assert client.post("/dlq/replay", json={}, headers=auth).status_code == 422
            summary = client.post("/dlq/replay", json={"ids": [result.id]}, headers=auth).json()
            assert summary["replayed"] == 1
            audit = client.get("/dlq/audit", params={"limit": 1}, headers=auth).json()[0]
            assert audit["by"] == "token:ops"
        stack.wait_effect(result.id)
    finally:
        stack.state.delete(fixed_key("demo.fail"))
