"""`pipeline up --demo`: traffic on all four tiers, a DLQ trickle of the events sent
to fail, the README's reward event handled, and nothing left for a later stack
started without --demo."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.local.demotraffic import DOOMED
from tests.integration.support import wait_for
from tests.integration.test_stack import Up, read_env_file, stacks_started

TIERS = ("critical", "high", "standard", "bulk")
# The built-in tiers and rules, one pool process each: four tiers on a shared machine.
ONE_PROCESS_EACH = {f"PIPELINE_TIERS__{t.upper()}__CONCURRENCY": "1" for t in TIERS}
TRAFFIC_TIMEOUT_S = 60.0  # every tier has handled demo events by then
HTTP_TIMEOUT_S = 5.0  # one request to the stack's API


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    with stacks_started(tmp_path) as start:
        yield start


def pipeline(env: dict[str, str], *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "pipeline", *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stack_env(up: Up) -> dict[str, str]:
    up.banner_value("broker")
    return {**up.env, **read_env_file(up.state / "stack.env")}


def post_event(env: dict[str, str], event: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{env['PIPELINE_API_URL']}/events", data=json.dumps(event).encode(), method="POST",
        headers={"Authorization": f"Bearer {env['PIPELINE_API_TOKEN']}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        assert response.status == 202
        body: dict[str, Any] = json.loads(response.read())
        return body


def test_the_demo_handles_events_on_every_tier_and_dead_letters_only_the_doomed_ones(
    start_up: Callable[..., Up],
) -> None:
    demo = start_up("--demo", config=None, env=ONE_PROCESS_EACH)
    env = stack_env(demo)
    assert env["PIPELINE_BROKER_URL"].endswith("/1")  # the demo's own database

    def every_tier_busy() -> bool:
        tiers = pipeline(env, "status")["tiers"]
        return all(t["succeeded_per_min"] > 0 for t in tiers) and len(tiers) == len(TIERS)

    wait_for(every_tier_busy, TRAFFIC_TIMEOUT_S, "demo events handled on every tier", 1.0)
    reward = post_event(env, {"id": str(uuid.uuid4()), "type": "reward.granted",
                              "source": "game-server",
                              "payload": {"user_id": 7, "amount": 100}})
    assert reward["tier"] == "critical"

    def dead_letters() -> list[dict[str, Any]]:
        return list(pipeline(env, "dlq", "list"))

    records = wait_for(dead_letters, TRAFFIC_TIMEOUT_S, "doomed demo events in the DLQ", 1.0)
    assert {r["event"]["type"] for r in records} <= set(DOOMED), records
    effects = wait_for(lambda: pipeline(env, "demo", "report", "--ids")["ids"], 30,
                       "demo effects")
    wait_for(lambda: reward["id"] in pipeline(env, "demo", "report", "--ids")["ids"], 30,
             "the README's reward event handled by the demo stack")
    assert effects
    assert reward["id"] not in {r["event"]["id"] for r in dead_letters()}
    demo.stop()
    assert demo.process.returncode == 0, demo.output()[-2000:]


def test_a_stack_without_demo_after_the_demo_sees_none_of_its_leftovers(
    start_up: Callable[..., Up],
) -> None:
    demo = start_up("--demo", config=None, env=ONE_PROCESS_EACH)
    env = stack_env(demo)

    def dead_letters_and_retries_pending() -> bool:
        status = pipeline(env, "status")
        standard = next(t for t in status["tiers"] if t["tier"] == "standard")
        return bool(status["dlq"]["depth"] and standard["retries_pending"])

    wait_for(dead_letters_and_retries_pending, TRAFFIC_TIMEOUT_S,
             "demo dead letters, and demo.fail retries pending", 0.5)
    demo.stop()
    assert demo.process.returncode == 0, demo.output()[-2000:]

    plain = start_up(config=None, env=ONE_PROCESS_EACH)
    plain_env = stack_env(plain)
    assert plain_env["PIPELINE_BROKER_URL"].endswith("/0")
    for tier in TIERS:
        plain.wait_ready(tier)
    status = pipeline(plain_env, "status")
    assert [t["retries_pending"] for t in status["tiers"]] == [0] * len(TIERS)
    assert status["dlq"]["depth"] == 0
    assert pipeline(plain_env, "dlq", "list") == []
    assert pipeline(plain_env, "demo", "report")["processed"] == 0
    # The demo's work stays in its own database, for the next --demo run.
    demo_db = {**plain_env,
               "PIPELINE_BROKER_URL": plain_env["PIPELINE_BROKER_URL"].removesuffix("/0") + "/1"}
    assert pipeline(demo_db, "status")["dlq"]["depth"] > 0
    assert pipeline(demo_db, "demo", "report")["processed"] > 0
