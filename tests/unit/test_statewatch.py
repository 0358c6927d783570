"""The state watch's probe: pause at the first failure, back off, resume once."""

from __future__ import annotations

import logging

import pytest
import redis

from pipeline.worker.statewatch import (
    PROBE_BACKOFF_MAX_S,
    PROBE_BACKOFF_MIN_S,
    PROBE_INTERVAL_S,
    StateWatch,
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
