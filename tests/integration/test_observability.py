"""Observability against a real broker and real prefork workers.

One stack for the module: a ``standard`` worker (prefork, concurrency 2) and a
``slow`` worker (tiny time limits), both recording metrics in a shared
``PROMETHEUS_MULTIPROC_DIR``; ``critical`` and ``bulk`` have no worker, so their
queues hold exactly what a test puts there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from pipeline.core.events import Event
from pipeline.core.retry import Reason
from pipeline.http.api import create_api
from pipeline.local.embedded import free_port
from pipeline.messages.task import RedisMessageRenderer, redis_list_key
from pipeline.observe.gauges import DLQ_EVICTIONS_KEY
from tests.integration.support import (
    SLOW_TIER,
    Server,
    Stack,
    get,
    start_server,
    stop_server,
    wait_for,
    write_config,
)

SECRET = "do-not-log-this-card-4111"  # a payload value that must never reach a log
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-test-pw"
ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observe")
    (tmp / "prom").mkdir()
    s = Stack(redis_url, write_config(tmp / "pipeline.toml", extra=SLOW_TIER), tmp,
              env_extra={"PROMETHEUS_MULTIPROC_DIR": str(tmp / "prom")})
    try:
        s.start_workers("standard", "slow")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def exporter(stack: Stack) -> Iterator[Server]:
    server = start_server(stack, "exporter", ["exporter", "--host", "127.0.0.1"], stack.env(),
                          "/metrics")
    yield server
    stop_server(server)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(server: Server) -> Samples:
    status, text = get(server.url("/metrics"))
    assert status == 200
    return parse(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def known_run(stack: Stack) -> dict[str, Any]:
    """Six successes, two permanent errors, one retried-then-exhausted failure, two slow
    tasks in parallel (both pool processes record), and one hard time limit twice."""
    ok = [stack.publish("demo.ok", payload={"card": SECRET}) for _ in range(6)]
    slow = [stack.publish("demo.slow", payload={"ms": 300}) for _ in range(2)]
    invalid = [stack.publish("demo.invalid") for _ in range(2)]
    fail = stack.publish("demo.fail")
    killed = stack.publish("demo.slow", tier="slow", payload={"ms": 5000,
                                                               "ignore_soft_limit": True})
    for r in ok + slow:
        stack.wait_effect(cast(str, r.id))
    for r in [*invalid, fail, killed]:
        stack.wait_dlq(cast(str, r.id), timeout_s=30)
    return {"ok": ok, "invalid": invalid, "fail": fail, "killed": killed}


def test_exporter_adds_up_task_metrics_recorded_by_every_prefork_process(
    stack: Stack, exporter: Server, known_run: dict[str, Any],
) -> None:
    expected = {
        ("pipeline_tasks_total", "standard", "demo.ok", "succeeded"): 6,
        ("pipeline_tasks_total", "standard", "demo.slow", "succeeded"): 2,
        ("pipeline_tasks_total", "standard", "demo.invalid", "dead_lettered"): 2,
        ("pipeline_tasks_total", "standard", "demo.fail", "retried"): 2,
        ("pipeline_tasks_total", "standard", "demo.fail", "dead_lettered"): 1,
        ("pipeline_tasks_total", "slow", "demo.slow", "retried"): 1,  # hard time limit
        ("pipeline_tasks_total", "slow", "demo.slow", "dead_lettered"): 1,
    }

    def counts() -> dict[tuple[str, str, str, str], float]:
        samples = scrape(exporter)
        return {key: value(samples, key[0], tier=key[1], handler=key[2], outcome=key[3])
                for key in expected}

    wait_for(lambda: counts() == expected, 20, f"task counters {expected} (last: {counts()})")
    samples = scrape(exporter)
    assert value(samples, "pipeline_dead_letters_total", tier="standard",
                 reason=Reason.PERMANENT_ERROR.value) == 2
    assert value(samples, "pipeline_dead_letters_total", tier="standard",
                 reason=Reason.RETRIES_EXHAUSTED.value) == 1
    assert value(samples, "pipeline_dead_letters_total", tier="slow",
                 reason=Reason.RETRIES_EXHAUSTED.value) == 1
    attempts = 6 + 2 + 2 + 3  # standard-tier attempts, retries included
    assert value(samples, "pipeline_queue_wait_seconds_count", tier="standard") == attempts
    assert value(samples, "pipeline_end_to_end_latency_seconds_count", tier="standard") == 8
    assert sum(value(samples, "pipeline_handler_duration_seconds_count", tier="standard",
                     handler=h) for h in ("demo.ok", "demo.slow", "demo.invalid",
                                          "demo.fail")) == attempts
    writers = {p.stem.split("_")[-1] for p in (stack.tmp / "prom").glob("counter_*.db")}
    assert len(writers) >= 3  # two standard pool processes and the slow worker's main process


def test_worker_logs_are_json_lines_with_the_event_fields_and_no_payload(
    stack: Stack, known_run: dict[str, Any],
) -> None:
    log = "".join(w.log() for w in stack.workers if w.tier == "standard")
    assert SECRET not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    event = known_run["ok"][0]
    about = [doc for doc in lines if doc.get("event_id") == event.id]
    done = next(doc for doc in about if "succeeded in" in doc["message"])
    assert {k: done[k] for k in ("type", "tier", "task_id", "attempt", "handler")} == {
        "type": "demo.ok", "tier": "standard", "task_id": event.task_ids[0], "attempt": 1,
        "handler": "demo.ok"}
    retried = [doc for doc in lines if doc.get("event_id") == known_run["fail"].id
               and doc.get("outcome") == "retried"]
    assert [doc["attempt"] for doc in retried] == [1, 2]
    assert all(doc["level"] == "warning" and doc["exception"].endswith("DemoTransientError")
               for doc in retried)


@pytest.fixture(scope="module")
def critical_backlog(stack: Stack) -> dict[str, Any]:
    """A known state on the worker-less critical tier: five queued messages (the oldest
    200 s old in priority sub-list 5, one 100 s old, three fresh; rendered both by the
    fast path and by kombu) and two scheduled retries."""
    rt = stack.rt
    now = time.time()

    def spec(age_s: float, priority: int | None = None) -> Any:
        message = Event(type="demo.ok", source="obs", priority=priority).to_message()
        one = rt.messages.spec(message, handler="demo.ok", tier="critical",
                                task_id=message["id"], attempt=1, priority=priority)
        one.enqueued_at = now - age_s
        return one

    renderer = RedisMessageRenderer(rt.app)
    task = rt.app.tasks["pipeline.handle"]
    for one in (spec(100), spec(0), spec(0)):
        key, payload = renderer.render(one)
        stack.state.lpush(key, payload)
    for one in (spec(200, priority=5), spec(0)):  # kombu's own JSON ("key": value)
        task.apply_async(args=one.args, kwargs=one.kwargs, **one.apply_async_options())
    for _ in range(2):
        rt.schedule.add(spec(0), now + 3600)
    return {"depth": 5, "oldest_s": 200.0, "retries": 2, "at": now}


def test_broker_gauges_match_the_brokers_real_state(
    stack: Stack, exporter: Server, critical_backlog: dict[str, Any],
) -> None:
    stack.state.set(DLQ_EVICTIONS_KEY, 7)
    try:
        samples = scrape(exporter)
    finally:
        stack.state.delete(DLQ_EVICTIONS_KEY)
    real_depth = sum(int(stack.state.llen(redis_list_key("critical", p))) for p in range(10))
    assert real_depth == critical_backlog["depth"]
    assert value(samples, "pipeline_queue_depth", tier="critical") == real_depth
    age = value(samples, "pipeline_queue_oldest_age_seconds", tier="critical")
    elapsed = time.time() - critical_backlog["at"]
    assert critical_backlog["oldest_s"] <= age <= critical_backlog["oldest_s"] + elapsed + 1
    assert value(samples, "pipeline_queue_oldest_age_seconds", tier="bulk") == 0
    assert value(samples, "pipeline_retries_pending", tier="critical") == 2
    assert value(samples, "pipeline_dlq_depth") == stack.rt.dlq.depth() > 0
    assert value(samples, "pipeline_dlq_evictions_total") == 7
    assert value(samples, "pipeline_workers_online", tier="standard") == 1
    assert value(samples, "pipeline_workers_online", tier="critical") == 0
    assert value(samples, "pipeline_tier_slo_seconds", tier="critical") == 300
    assert value(samples, "pipeline_broker_up") == 1


def test_oldest_age_grows_while_a_tier_has_no_worker(
    exporter: Server, critical_backlog: dict[str, Any],
) -> None:
    first = value(scrape(exporter), "pipeline_queue_oldest_age_seconds", tier="critical")
    time.sleep(1.1)
    second = value(scrape(exporter), "pipeline_queue_oldest_age_seconds", tier="critical")
    assert second - first >= 1.0


def test_api_metrics_need_the_token_and_count_ingest_outcomes(stack: Stack) -> None:
    with TestClient(create_api(stack.rt, token="obs-token-0123456789")) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        auth = {"Authorization": "Bearer obs-token-0123456789"}
        labels = {"tier": "bulk", "type": "demo.ok", "outcome": "accepted", "reason": ""}
        before = value(parse(client.get("/metrics", headers=auth).text),
                       "pipeline_events_total", **labels)
        event = {"type": "demo.ok", "source": "batch-obs"}
        assert client.post("/events", json=event, headers=auth).status_code == 202
        response = client.get("/metrics", headers=auth)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        samples = parse(response.text)
        assert value(samples, "pipeline_events_total", **labels) == before + 1
        assert value(samples, "pipeline_queue_depth", tier="bulk") >= 1
    stack.state.delete(*[redis_list_key("bulk", p) for p in range(10)])


def run_status(stack: Stack, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", "status", "--json"],
                          capture_output=True, text=True, timeout=60,
                          env={**stack.env(), **env})


def test_status_exits_1_when_a_tier_without_worker_is_past_its_slo(
    stack: Stack, critical_backlog: dict[str, Any],
) -> None:
    proc = run_status(stack, PIPELINE_TIERS__CRITICAL__SLO_S="0.5")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["late"] == ["critical"]
    critical = next(t for t in report["tiers"] if t["tier"] == "critical")
    assert critical["depth"] == critical_backlog["depth"]
    assert critical["oldest_age_s"] >= critical_backlog["oldest_s"]
    assert critical["retries_pending"] == 2
    assert critical["workers_online"] == 0


def test_status_exits_0_and_shows_every_tier_when_none_is_late(
    stack: Stack, known_run: dict[str, Any], critical_backlog: dict[str, Any],
) -> None:
    proc = run_status(stack, PIPELINE_TIERS__CRITICAL__SLO_S="100000")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["late"] == []
    tiers = {t["tier"]: t for t in report["tiers"]}
    assert set(tiers) == {"critical", "standard", "bulk", "slow"}
    assert tiers["standard"]["workers_online"] == 1
    assert tiers["standard"]["succeeded_per_min"] > 0
    assert report["dlq"]["depth"] == stack.rt.dlq.depth()


def test_flower_requires_auth_and_lists_every_tier_queue_and_the_dlq(
    stack: Stack, critical_backlog: dict[str, Any],
) -> None:
    refused = subprocess.run([sys.executable, "-m", "pipeline", "flower", "--port",
                              str(free_port())], capture_output=True, text=True, timeout=60,
                             env=stack.env())
    assert refused.returncode == 2
    assert "no authentication" in refused.stderr
    env = {**stack.env(), "PIPELINE_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    flower = start_server(stack, "flower", ["flower"], env, "/healthcheck")
    auth = (FLOWER_USER, FLOWER_PASSWORD)
    try:
        assert get(flower.url("/api/queues/length"))[0] == 401
        assert get(flower.url("/api/queues/length"), ("ops", "wrong"))[0] == 401
        status, body = get(flower.url("/api/queues/length"), auth)
        assert status == 200
        depths = {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}
        assert {"critical", "standard", "bulk", "slow", "dead_letter"} <= set(depths)
        assert depths["critical"] == critical_backlog["depth"]  # no worker, still listed
        workers = json.loads(get(flower.url("/api/workers?refresh=1"), auth)[1])
        assert any(name.startswith("standard@") for name in workers)

        event = stack.publish("demo.ok")
        stack.wait_effect(cast(str, event.id))

        def found() -> list[dict[str, Any]]:
            tasks = json.loads(get(flower.url(f"/api/tasks?search={event.id}"), auth)[1])
            return list(tasks.values())

        (task,) = wait_for(found, 20, "Flower to list the event's task")
        assert task["name"] == "pipeline.handle[demo.ok]"
        assert event.id in task["args"]
    finally:
        stop_server(flower)
    assert FLOWER_PASSWORD not in flower.log_path.read_text()


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_a_real_prometheus_scrapes_the_exporter_and_evaluates_the_alert_rules(
    stack: Stack, exporter: Server, critical_backlog: dict[str, Any],
) -> None:
    port = free_port()
    config = stack.tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "ops" / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "pipeline-exporter", "static_configs": [
            {"targets": [f"127.0.0.1:{exporter.port}"]}]}],
    }))
    log_path = stack.tmp / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={stack.tmp / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)

    def query(promql: str) -> list[dict[str, Any]]:
        try:
            status, body = get(server.url(f"/api/v1/query?query={urllib.parse.quote(promql)}"))
        except OSError:  # not listening yet
            return []
        return list(json.loads(body)["data"]["result"]) if status == 200 else []

    try:
        depth = wait_for(lambda: query('pipeline_queue_depth{tier="critical"}'), 30,
                         "Prometheus to scrape the exporter", interval_s=0.3)
        assert float(depth[0]["value"][1]) == critical_backlog["depth"]
        pending = wait_for(lambda: query('ALERTS{alertname="PipelineNoWorkerOnline"}'), 30,
                           "the no-worker alert to be pending", interval_s=0.3)
        assert {a["metric"]["tier"] for a in pending} == {"critical", "bulk"}
    finally:
        stop_server(server)
