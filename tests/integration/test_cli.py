"""The command line against a real broker: send, dlq list, demo report, and `pipeline up`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from pipeline.core.state import Keys
from pipeline.local.embedded import free_port
from tests.integration.support import Stack, alive, descendants, wait_for, write_config


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cli")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml"), tmp)
    try:
        s.start_worker("standard")
        yield s
    finally:
        s.stop()


def run_cli(stack: Stack, *args: str, stdin: str = "",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], input=stdin,
                          capture_output=True, text=True, env=env or stack.env(), timeout=60)


def test_send_accepts_valid_lines_and_reports_each_rejected_one(stack: Stack) -> None:
    lines = [
        json.dumps({"type": "demo.ok", "source": "cli-test"}),
        "",
        json.dumps({"type": "Not.Valid", "source": "cli-test"}),
        "{not json",
        json.dumps({"type": "demo.invalid", "source": "cli-test"}),
    ]
    proc = run_cli(stack, "send", "--json", "-", stdin="\n".join(lines))
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["accepted"] == 2
    assert summary["rejected"] == 2
    rejected = {item["line"]: item["errors"] for item in summary["rejected_lines"]}
    assert set(rejected) == {3, 4}
    assert rejected[3][0]["field"] == "type"
    assert rejected[3][0]["value"] == "Not.Valid"
    assert rejected[4][0]["field"] == "<document>"


def test_send_names_the_file_line_and_the_json_column_and_clips_values(stack: Stack) -> None:
    lines = [
        json.dumps({"type": "demo.ok", "source": "cli-test"}),
        '{"type": "demo.ok", "source": "cli-test"',
        json.dumps({"source": "cli-test", "payload": {"blob": "y" * 5000}}),
        json.dumps({"type": "Z" * 5000, "source": "cli-test"}),
    ]
    proc = run_cli(stack, "send", "-", stdin="\n".join(lines))
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "accepted 1, duplicate 0, rejected 3 (invalid 3)"
    assert out[1] == ("  line 2: <document>: not JSON: Expecting ',' delimiter at column 41"), out
    assert out[2] == "  line 3: type: Field required"  # a missing field: no value shown
    assert out[3].startswith("  line 4: type='ZZZ")
    assert all(len(line) < 300 for line in out)


def test_send_to_an_unreachable_broker_fails_clearly_and_accepts_nothing(stack: Stack) -> None:
    env = {**stack.env(), "PIPELINE_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
           "PIPELINE_PUBLISH_MAX_RETRIES": "0"}
    proc = run_cli(stack, "send", "-", stdin=json.dumps({"type": "demo.ok", "source": "x"}),
                   env=env)
    assert proc.returncode == 3
    assert "unreachable" in proc.stderr
    assert "0 accepted" in proc.stderr
    assert proc.stdout == ""


def test_dlq_show_takes_an_unambiguous_prefix_and_lists_candidates_otherwise(
    stack: Stack,
) -> None:
    stem = uuid.uuid4().hex[:8]  # two event ids sharing their first 24 characters
    ids = [f"{stem}-abcd-4bcd-8bcd-{n * 12}" for n in ("1", "2")]
    for event_id in ids:
        stack.publish("demo.invalid", id=event_id)
    records = [stack.wait_dlq(event_id) for event_id in ids]

    by_event = run_cli(stack, "dlq", "show", ids[0][:26])
    assert by_event.returncode == 0, by_event.stderr
    assert json.loads(by_event.stdout.split("\nTraceback")[0])["id"] == records[0].id
    by_record = run_cli(stack, "dlq", "show", records[1].id[:10])
    assert by_record.returncode == 0, by_record.stderr
    assert f'"id": "{records[1].id}"' in by_record.stdout

    ambiguous = run_cli(stack, "dlq", "show", stem)
    assert ambiguous.returncode == 1
    assert "names 2 records; use a longer prefix" in ambiguous.stderr
    for record in records:
        assert f"record {record.id}  event {record.event_id}" in ambiguous.stderr
    missing = run_cli(stack, "dlq", "show", "ffff" * 60)
    assert missing.returncode == 1
    assert len(missing.stderr) < 200


def test_dlq_list_json_prints_records_as_a_json_array(stack: Stack) -> None:
    result = stack.publish("demo.invalid")
    assert result.id is not None
    stack.wait_dlq(result.id)
    proc = run_cli(stack, "dlq", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert isinstance(records, list)
    (mine,) = [r for r in records if r["event"]["id"] == result.id]
    assert mine["reason"] == "permanent_error"
    for field in ("id", "event", "tier", "handler", "reason", "attempts", "exception",
                  "message", "traceback", "first_failed_at", "last_failed_at", "worker"):
        assert field in mine


def test_demo_report_accounts_for_processed_events(stack: Stack) -> None:
    results = [stack.publish("demo.ok") for _ in range(5)]
    for r in results:
        assert r.id is not None
        stack.wait_effect(r.id)
    proc = run_cli(stack, "demo", "report", "--json", "--ids")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert {r.id for r in results} <= set(report["ids"])
    assert report["processed"] == len(report["ids"])
    assert report["duplicate_effects"] == 0




def test_pipeline_up_runs_a_broker_and_tier_workers_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    config = tmp_path / "small.toml"
    config.write_text('handler_modules = ["pipeline.demo"]\n'
                      "[tiers.critical]\nconcurrency = 1\nprefetch_multiplier = 1\n"
                      "[tiers.standard]\nconcurrency = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    out = tmp_path / "up.out"
    with out.open("wb") as handle:
        up = subprocess.Popen([sys.executable, "-m", "pipeline", "up", "--config", str(config),
                               "--state-dir", str(tmp_path / "state")],
                              env=env, stdout=handle, stderr=subprocess.STDOUT)
    try:
        banner = wait_for(lambda: re.search(r"broker:\s+(redis://\S+)", out.read_text()), 30,
                          "the banner")
        url = banner.group(1)
        logs = tmp_path / "state" / "logs"
        for tier in ("critical", "standard"):
            wait_for(cast(Callable[[], bool],
                          lambda t=tier: " ready." in (logs / f"worker-{t}.log").read_text()
                          if (logs / f"worker-{t}.log").exists() else False),
                     30, f"{tier} worker")
        processes = descendants(up.pid)
        assert len(processes) >= 5  # broker, 2 worker mains, 2 pool children
        event = {"type": "demo.ok", "source": "vip-app"}
        sent = subprocess.run([sys.executable, "-m", "pipeline", "send", "--json", "-"],
                              input=json.dumps(event), capture_output=True, text=True,
                              env={**env, "PIPELINE_BROKER_URL": url,
                                   "PIPELINE_CONFIG": str(config)}, timeout=60)
        assert sent.returncode == 0, sent.stderr
        client = redis.Redis.from_url(url)
        wait_for(lambda: client.hlen(Keys.demo_effects()) == 1, 20, "the event to be processed")
        client.close()
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)
    assert up.returncode == 0, out.read_text()[-2000:]
    time.sleep(0.2)
    leftovers = [pid for pid in processes if alive(pid)]
    assert leftovers == [], f"processes left behind: {leftovers}"


def test_breaker_close_releases_the_work_the_forced_open_breaker_deferred(
    stack: Stack,
) -> None:
    assert run_cli(stack, "breaker", "open", "demo-api").returncode == 0
    try:
        event = stack.publish("demo.flaky", payload={"fail_rate": 0.0})
        wait_for(lambda: stack.state.zcard(Keys.breaker_holds("demo-api")) >= 1, 10,
                 "the deferral to be held")
        (entry,) = cast(list[bytes],
                        stack.state.hvals(Keys.breaker_holds("demo-api") + ":entries"))
        key, member = bytes(entry).split(b"\n", 1)  # the deferral's schedule entry
        due_s = float(stack.state.zscore(key, member) or 0) - time.time()
        assert due_s > 5  # the default demo-api breaker: open_s 10, spread on top
    finally:
        closed = run_cli(stack, "breaker", "close", "demo-api")
    assert closed.returncode == 0, closed.stderr
    assert "1 deferred task(s) due now" in closed.stdout
    stack.wait_effect(str(event.id), timeout_s=5)  # not the 5+ s it was deferred for
