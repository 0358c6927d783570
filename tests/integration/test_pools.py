"""Every pool (prefork, threads, gevent) keeps the promise, with real workers: retries
and the DLQ, two deliveries of one task at once, a SIGKILLed worker, async handlers
and per-attempt log fields."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from pipeline.core.retry import Reason
from pipeline.messages.taskids import task_id_for
from tests.integration.support import IO_MODULES, Stack, wait_for, write_config

IO_TIER = """
[tiers.io]
queue = "{prefix}io"
pool = "{pool}"
accept_unenforced_time_limit = true
concurrency = {concurrency}
prefetch_multiplier = 2
max_retries = 1
backoff_base_s = 0.1
backoff_max_s = 0.2
soft_time_limit_s = 2
time_limit_s = 3
lost_after_s = 3
"""
CONCURRENCY = {"prefork": 2, "threads": 16, "gevent": 16}  # attempts at once per worker


@pytest.fixture(scope="module", params=["prefork", "threads", "gevent"])
def stack(request: pytest.FixtureRequest, redis_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pool = request.param
    tmp = tmp_path_factory.mktemp(f"pool-{pool}")
    config = write_config(tmp / "pipeline.toml", prefix=f"{pool}-", extra=IO_TIER.format(
        prefix=f"{pool}-", pool=pool, concurrency=CONCURRENCY[pool]),
        handler_modules=IO_MODULES)
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    s = Stack(redis_url, config, tmp, env_extra={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        s.start_worker("io")
        yield s
    finally:
        s.stop()


def io_worker(stack: Stack) -> str:
    return "".join(w.log() for w in stack.workers if w.tier == "io")


def test_the_worker_runs_the_tiers_pool(stack: Stack) -> None:
    pool = stack.rt.settings.tier("io").pool
    assert f", pool {pool} (the tier's settings)" in io_worker(stack)


def test_attempts_run_at_once_are_each_counted_in_multiprocess_metrics(stack: Stack) -> None:
    results = [stack.publish("demo.ok", tier="io") for _ in range(20)]
    for r in results:
        stack.wait_effect(str(r.id))
    registry = CollectorRegistry()
    MultiProcessCollector(registry,  # type: ignore[no-untyped-call]
                          path=stack.env_extra["PROMETHEUS_MULTIPROC_DIR"])
    labels = {"tier": "io", "handler": "demo.ok", "outcome": "succeeded"}
    assert wait_for(lambda: registry.get_sample_value("pipeline_tasks_total", labels) == 20,
                    10, "20 succeeded attempts to be counted")


def test_a_failing_handler_is_retried_then_dead_lettered(stack: Stack) -> None:
    result = stack.publish("demo.fail", tier="io")
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 2  # io: max_retries = 1
    assert record.message == "demo.fail always fails (attempt 2)"


def test_two_deliveries_of_one_task_at_once_run_its_handler_once(stack: Stack) -> None:
    publisher = stack.rt.publisher
    event: dict[str, Any] = {"id": str(uuid.uuid4()), "type": "demo.slow", "source": "tests",
                             "payload": {"ms": 500}}
    spec = stack.rt.messages.spec(event, handler="demo.slow", tier="io",
                                  task_id=task_id_for(event["id"], "demo.slow"), attempt=1)
    assert publisher._renderer is not None  # a Redis broker
    for _ in range(2):  # the same try, delivered twice (a restored message, say)
        key, payload = publisher._renderer.render(spec)
        stack.state.lpush(key, payload)
    stack.wait_effect(event["id"])
    wait_for(lambda: "already succeeded" in io_worker(stack), 30,
             "the second delivery to find the done mark")
    assert stack.effects(event["id"]) == 1
    assert stack.dlq_for(event["id"]) == []


def test_a_worker_killed_mid_attempt_has_the_event_run_once_by_its_replacement(
    stack: Stack,
) -> None:
    (worker,) = [w for w in stack.workers if w.tier == "io"]
    result = stack.publish("demo.slow", tier="io", payload={"ms": 1500})
    assert result.id is not None
    wait_for(lambda: "demo.slow" in worker.log() and
             stack.state.keys(f"pipeline:running:{result.task_ids[0]}:*"), 10,
             "the attempt to start")
    worker.kill_all()  # SIGKILL: the main process and any pool children
    stack.workers.remove(worker)
    assert stack.effects(result.id) == 0
    stack.start_worker("io")
    stack.wait_effect(result.id, timeout_s=30)
    assert stack.effects(result.id) == 1
    assert stack.dlq_for(str(result.id)) == []


def test_async_handlers_run_once_each_with_their_own_log_fields(stack: Stack) -> None:
    results = []
    lock = threading.Lock()

    def send() -> None:
        for _ in range(10):
            r = stack.publish("io.async_ok", tier="io")
            with lock:
                results.append(r)

    senders = [threading.Thread(target=send) for _ in range(3)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    for r in results:
        stack.wait_effect(str(r.id))
    assert {stack.effects(str(r.id)) for r in results} == {1}
    lines = [json.loads(line) for line in io_worker(stack).splitlines()
             if "async handler ran for" in line]
    ran = {line["message"].rsplit(" ", 1)[1]: line for line in lines}
    assert set(ran) >= {str(r.id) for r in results}
    for event_id, line in ran.items():
        assert line["event_id"] == event_id  # no field of another attempt leaked in


def test_an_async_handler_past_its_soft_limit_is_cancelled_and_dead_lettered(
    stack: Stack,
) -> None:
    result = stack.publish("io.async_stuck", tier="io")
    assert result.id is not None
    record = stack.wait_dlq(result.id, timeout_s=30)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.exception.endswith("SoftTimeLimitExceeded")
    assert stack.effects(f"{result.id}:cancelled") == 2  # both attempts were cancelled
    assert stack.effects(f"{result.id}:finished") == 0
