"""Task events under the threads and gevent pools tell what each attempt settled as.

A worker of a ``threads`` tier and one of a ``gevent`` tier (task events on, as
``pipeline worker`` starts them), and a real event receiver in this process that
feeds Celery's own state machine (``app.events.State``, what Flower keeps): a
success is received, started, succeeded and SUCCESS; a dead letter is failed and
FAILURE with its reason; a failed attempt whose retry is scheduled is retried and
RETRY, never SUCCESS (:mod:`pipeline.worker.taskstate`). Their retry movers first look a
minute after start, so no scheduled retry runs during the test.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.producer.results import PublishResult
from tests.integration.support import Stack, wait_for, write_config

EVENTS_TIMEOUT_S = 30.0  # a task's events have all arrived within this
MOVER_POLL_S = "60"
POOLS = ("threads", "gevent")

TIERS = "".join(f"""
[tiers.ev{pool}]
queue = "ev-{pool}"
pool = "{pool}"
accept_unenforced_time_limit = true
concurrency = 8
prefetch_multiplier = 1
max_retries = 1
backoff_base_s = 3600
backoff_max_s = 3600
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5
""" for pool in POOLS)


class Events:
    """Every event the workers send, by task id, and Celery's state of each task."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.state = app.events.State()
        self.by_task: dict[str, list[str]] = defaultdict(list)
        self.hostnames: set[str] = set()
        self.lock = threading.Lock()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._capture, daemon=True)
        self.thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.state.event(event)
            if event["type"].startswith("task-"):
                self.by_task[event["uuid"]].append(event["type"])
            self.hostnames.add(str(event.get("hostname", "")))

    def _capture(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True

    def types(self, task_id: str) -> list[str]:
        with self.lock:
            return list(self.by_task.get(task_id, []))

    def task(self, task_id: str) -> Any:
        with self.lock:
            return self.state.tasks.get(task_id)

    def settled(self, task_id: str, last: str) -> Any:
        """The task once its ``last`` event has arrived."""
        wait_for(lambda: last in self.types(task_id), EVENTS_TIMEOUT_S,
                 f"{last} of task {task_id}", 0.1)
        return self.task(task_id)


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("task-events-pools")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml", prefix="ev-", extra=TIERS), tmp)
    try:
        started = [s.start_worker(f"ev{pool}", wait=False,
                                  env={"PIPELINE_RETRY_POLL_INTERVAL_S": MOVER_POLL_S})
                   for pool in POOLS]
        for worker in started:
            worker.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def events(stack: Stack) -> Iterator[Events]:
    received = Events(stack.rt.app)
    try:  # subscribed once every worker's heartbeat comes through
        wait_for(lambda: {f"ev{p}@" for p in POOLS} <= {h.split("@")[0] + "@"
                                                     for h in received.hostnames},
                 EVENTS_TIMEOUT_S, "both workers' events", 0.2)
        yield received
    finally:
        received.stop()


@pytest.fixture(scope="module")
def sent(stack: Stack, events: Events) -> dict[tuple[str, str], PublishResult]:
    """One event of each kind on each pool's tier, sent once the receiver listens."""
    kinds = {"ok": ("demo.ok", {}), "dead": ("demo.invalid", {}),
             "retrying": ("demo.ok", {"poison": True})}
    return {(pool, kind): stack.publish(type_, tier=f"ev{pool}", payload=payload)
            for pool in POOLS for kind, (type_, payload) in kinds.items()}


def test_both_workers_run_the_pool_of_their_tier(stack: Stack) -> None:
    for pool in POOLS:
        (worker,) = [w for w in stack.workers if w.tier == f"ev{pool}"]
        assert f", pool {pool} (the tier's settings)" in worker.log()
        assert "task events: ON" in worker.log()


@pytest.mark.parametrize("pool", POOLS)
def test_a_success_is_received_started_succeeded_and_success(
    events: Events, sent: dict[tuple[str, str], PublishResult], pool: str,
) -> None:
    task_id = sent[pool, "ok"].task_ids[0]
    task = events.settled(task_id, "task-succeeded")
    assert events.types(task_id) == ["task-received", "task-started", "task-succeeded"]
    assert task.state == "SUCCESS"
    assert task.result == "'succeeded'"
    assert task.hostname.startswith(f"ev{pool}@")


@pytest.mark.parametrize("pool", POOLS)
def test_a_dead_letter_is_failed_and_failure_with_its_reason(
    stack: Stack, events: Events, sent: dict[tuple[str, str], PublishResult], pool: str,
) -> None:
    result = sent[pool, "dead"]
    task = events.settled(result.task_ids[0], "task-failed")
    record = stack.wait_dlq(str(result.id))
    assert events.types(result.task_ids[0]) == ["task-received", "task-started", "task-failed"]
    assert task.state == "FAILURE"
    assert task.exception == (
        "DeadLettered('dead-lettered (permanent_error) after attempt 1: "
        "pipeline.errors.PermanentError: demo.invalid can never succeed "
        f"[DLQ record {record.id}]')")


@pytest.mark.parametrize("pool", POOLS)
def test_a_failed_attempt_with_its_retry_scheduled_is_retried_and_retry_never_success(
    events: Events, sent: dict[tuple[str, str], PublishResult], pool: str,
) -> None:
    task_id = sent[pool, "retrying"].task_ids[0]
    task = events.settled(task_id, "task-retried")
    time.sleep(0.5)  # anything sent after it would have arrived
    assert events.types(task_id) == ["task-received", "task-started", "task-retried"]
    assert task.state == "RETRY"
    assert str(task.exception).startswith(
        "RetryScheduled('attempt 1 of 2 failed: pipeline.demo.DemoTransientError: "
        "poisoned event; attempt 2 due at ")
