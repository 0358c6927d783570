"""The state watch's probe: pause at the first failure, back off, resume once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis

from pipeline.worker.statewatch import (
    PROBE_BACKOFF_MAX_S,
    PROBE_BACKOFF_MIN_S,
    PROBE_INTERVAL_S,
    StateWatch,
    StateWatchStep,
)


class FlakyPing:
    def __init__(self) -> None:
        self.up = True

    def __call__(self) -> bool:
        if not self.up:
            raise redis.ConnectionError("refused")
        return True


def _watch(ping: FlakyPing, calls: list[str]) -> StateWatch:
    return StateWatch(ping, lambda: calls.append("down"), lambda: calls.append("up"),
                      rand=lambda: 1.0)


def test_probe_pauses_once_backs_off_and_resumes_once() -> None:
    calls: list[str]
    ping, calls = FlakyPing(), []
    watch = _watch(ping, calls)
    assert watch.probe() == PROBE_INTERVAL_S
    ping.up = False
    delays = [watch.probe() for _ in range(8)]
    assert calls == ["down"]
    assert delays == sorted(delays)  # exponential (rand pinned to the window's top) ...
    assert delays[-1] == PROBE_BACKOFF_MIN_S + PROBE_BACKOFF_MAX_S  # ... up to the cap
    ping.up = True
    assert watch.probe() == PROBE_INTERVAL_S
    assert watch.probe() == PROBE_INTERVAL_S
    assert calls == ["down", "up"]
    assert watch.failures == 0


def test_a_watch_started_paused_resumes_at_the_first_answer() -> None:
    """After a consumer restart while paused, the tier queues are still deselected."""
    calls: list[str] = []
    watch = StateWatch(FlakyPing(), lambda: calls.append("down"), lambda: calls.append("up"),
                       down=True)
    watch.probe()
    assert calls == ["up"]


def test_a_long_outage_says_so_once_per_interval_with_its_counts(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    ping, calls = FlakyPing(), []
    watch = StateWatch(ping, lambda: calls.append("down"), lambda: calls.append("up"),
                       rand=lambda: 1.0, clock=lambda: now[0])
    ping.up = False
    with caplog.at_level(logging.WARNING, logger="pipeline.worker.statewatch"):
        while now[0] < 35.0:  # 35 s down, a probe every 0.5 s
            watch.probe()
            now[0] += 0.5
    lines = [r.getMessage() for r in caplog.records]
    still = [m for m in lines if "still unreachable" in m]
    assert len(still) == 3  # at 10, 20 and 30 s
    assert len(lines) == 1 + len(still)  # and the pause itself
    assert "after 10s (21 failed probes" in still[0]
    ping.up = True
    watch.probe()
    assert "answers again after 35s and 70 failed probes" in caplog.records[-1].getMessage()


class FakeConsumer:
    """What the step uses of Celery's consumer: its queues and the event loop's queue
    of callbacks (kombu's hub runs them in no set order)."""

    def __init__(self, queues: list[str]) -> None:
        self.consuming = set(queues)
        self.queued: list[Callable[[], None]] = []
        self.hub = self
        self.task_consumer = self

    def call_soon(self, callback: Callable[..., None], *args: Any) -> None:
        self.queued.append(lambda: callback(*args))

    def consuming_from(self, queue: str) -> bool:
        return queue in self.consuming

    def cancel_task_queue(self, queue: str) -> None:
        self.consuming.discard(queue)

    def add_task_queue(self, queue: str) -> None:
        self.consuming.add(queue)


def _step(c: FakeConsumer, ping: FlakyPing) -> StateWatchStep:
    step = StateWatchStep.__new__(StateWatchStep)  # without a worker's runtime
    step.queues, step.paused = sorted(c.consuming), set()
    step.watch = step._new_watch(c, ping)  # as start() makes it
    return step


@pytest.mark.parametrize("order", ["as queued", "up first"])
def test_a_down_and_up_queued_together_leave_the_queues_consumed_in_either_order(
        order: str) -> None:
    c, ping = FakeConsumer(["bulk", "standard"]), FlakyPing()
    step = _step(c, ping)
    ping.up = False
    assert step.watch is not None
    step.watch.probe()
    ping.up = True
    step.watch.probe()  # the event loop was busy all along: both wait in its queue
    assert len(c.queued) == 2
    for callback in c.queued if order == "as queued" else reversed(c.queued):
        callback()
    assert c.consuming == {"bulk", "standard"}
    assert step.paused == set()


def test_a_pause_run_while_still_down_stops_each_tier_queue_once() -> None:
    c, ping = FakeConsumer(["bulk", "standard"]), FlakyPing()
    step = _step(c, ping)
    ping.up = False
    assert step.watch is not None
    step.watch.probe()
    step._follow(c)  # a second callback while still down: nothing more to stop
    c.queued[0]()
    assert c.consuming == set()
    assert step.paused == {"bulk", "standard"}
