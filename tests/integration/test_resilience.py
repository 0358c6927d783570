"""Retries stay correct at scale, and work survives killed workers.

(a) a retry waiting longer than the visibility timeout runs once;
(b) pending retries survive SIGTERM and SIGKILL of their worker;
(c) thousands of pending retries do not delay fresh events of the same tier.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import cast

import pytest

from pipeline.core.state import Keys
from tests.integration.support import Stack, wait_for, write_config

VISIBILITY_TIMEOUT_S = 6.0  # short, so redelivery after a node crash is testable
# worker arguments per pool: the command line's pool wins over the tier's (prefork)
POOL_ARGS = {"prefork": (), "threads": ("-P", "threads", "-c", "8"),
             "gevent": ("-P", "gevent", "-c", "8")}


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("resilience")
    config = write_config(tmp / "pipeline.toml", vt=VISIBILITY_TIMEOUT_S, soft=2.0, hard=2.5)
    s = Stack(redis_url, config, tmp)
    try:
        yield s
    finally:
        s.stop()


def pending_retries(stack: Stack, queue: str) -> int:
    return int(stack.state.zcard(Keys.retries(queue)))


def test_thousand_pending_retries_do_not_delay_a_fresh_event_of_the_tier(stack: Stack) -> None:
    worker = stack.start_worker("bulk")
    failing = [stack.publish("demo.retry_after", source="batch-load",
                             payload={"delay_s": 300, "fail_times": 1}) for _ in range(1000)]
    assert {r.tier for r in failing} == {"bulk"}
    wait_for(lambda: pending_retries(stack, "bulk") == 1000, 60, "1000 retries to be pending")
    # no retry is held by the worker (the last one's ack follows its settle closely)
    wait_for(lambda: stack.state.hlen("unacked") == 0, 5, "every failed delivery to be acked")

    started = time.monotonic()
    fresh = stack.publish("demo.ok", source="batch-fresh")
    assert fresh.id is not None
    stack.wait_effect(fresh.id, timeout_s=5)
    latency_s = time.monotonic() - started
    assert latency_s < 1.0, f"fresh event waited {latency_s:.3f}s behind pending retries"
    assert pending_retries(stack, "bulk") == 1000
    worker.stop()
    stack.state.delete(Keys.retries("bulk"))


def test_retry_waiting_longer_than_visibility_timeout_runs_exactly_once(stack: Stack) -> None:
    worker = stack.start_worker("critical")
    delay_s = VISIBILITY_TIMEOUT_S + 2
    result = stack.publish("demo.retry_after", source="vip-1",
                           payload={"delay_s": delay_s, "fail_times": 1})
    assert result.id is not None
    wait_for(lambda: pending_retries(stack, "critical") == 1, 10, "the retry to be scheduled")
    stack.wait_effect(result.id, timeout_s=delay_s + 10)
    time.sleep(VISIBILITY_TIMEOUT_S + 2)  # any redelivery would have happened by now
    assert stack.effects(result.id) == 1
    assert stack.state.hlen("unacked") == 0
    worker.stop()


@pytest.mark.parametrize("pool", list(POOL_ARGS))
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_pending_retries_survive_their_worker_being_stopped(stack: Stack, how: str,
                                                            pool: str) -> None:
    worker = stack.start_worker("critical", *POOL_ARGS[pool])
    events = [stack.publish("demo.retry_after", source="vip-2",
                            payload={"delay_s": 3.0, "fail_times": 1}) for _ in range(20)]
    wait_for(lambda: pending_retries(stack, "critical") == 20, 20, "20 retries to be pending")
    if how == "sigterm":
        worker.stop()
    else:
        worker.kill_all()
    replacement = stack.start_worker("critical", *POOL_ARGS[pool])
    for event in events:
        assert event.id is not None
        stack.wait_effect(event.id, timeout_s=30)
    assert all(stack.effects(cast(str, e.id)) == 1 for e in events)
    replacement.stop()


def test_worker_child_killed_mid_task_the_event_is_still_processed(stack: Stack) -> None:
    worker = stack.start_worker("critical")
    result = stack.publish("demo.slow", source="vip-3", payload={"ms": 1500})
    assert result.id is not None
    wait_for(lambda: _running(stack, result.task_ids[0]), 10, "the task to start")
    (child,) = worker.child_pids()
    os.kill(child, signal.SIGKILL)
    stack.wait_effect(result.id, timeout_s=20)
    assert stack.effects(result.id) == 1
    assert stack.dlq_for(result.id) == []
    worker.stop()


@pytest.mark.parametrize("pool", list(POOL_ARGS))
def test_whole_worker_killed_mid_task_the_event_is_redelivered_and_processed(
    stack: Stack, pool: str,
) -> None:
    worker = stack.start_worker("critical", *POOL_ARGS[pool])
    result = stack.publish("demo.slow", source="vip-4", payload={"ms": 1500})
    assert result.id is not None
    wait_for(lambda: _running(stack, result.task_ids[0]), 10, "the task to start")
    worker.kill_all()  # main process and children: the message stays unacked
    assert stack.effects(result.id) == 0
    replacement = stack.start_worker("critical", *POOL_ARGS[pool])
    stack.wait_effect(result.id, timeout_s=VISIBILITY_TIMEOUT_S + 20)
    assert stack.effects(result.id) == 1
    replacement.stop()


def _running(stack: Stack, task_id: str) -> bool:
    """Whether a try of ``task_id`` has begun and not settled (its running mark)."""
    return bool(stack.state.keys(Keys.running(task_id, "*")))
