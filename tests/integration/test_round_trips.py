"""Redis round trips per event on a real worker, counted with MONITOR: a change that
adds one to every attempt fails here, not only in a benchmark.

One no-op event costs, with task events off: the fetch (one Lua call that also
carries earlier acks and may take several messages), the begin and the settle (one
Lua call each), whether or not its handler calls a downstream behind a circuit
breaker (the begin asks the breaker, the settle records the outcome). Commands a
Lua script runs inside the server are not round trips and are not counted (MONITOR
tags them ``lua``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.local.embedded import EmbeddedServer, start_server
from tests.integration.support import Stack, wait_for

EVENTS = 600  # no-op events counted
MAX_ROUND_TRIPS_PER_EVENT = 3.5  # fetch (<= 1), begin, settle; heartbeats and movers aside

CONFIG = """
handler_modules = ["pipeline.demo", "tests.integration.io_handlers"]
default_tier = "standard"
retry_poll_interval_s = 0.25

[tiers.standard]
concurrency = 2
prefetch_multiplier = 4
task_events = false
retry_budget_ratio = 0
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    s = start_server(tmp_path / "broker", persist=False)  # MONITOR sees only this test
    yield s
    s.stop()


class _Monitor:
    """Counts client commands (not those run inside Lua) until stopped."""

    def __init__(self, url: str) -> None:
        self.counts: Counter[str] = Counter()
        self._url = url
        self._client = redis.Redis.from_url(url)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        with self._client.monitor() as m:  # type: ignore[no-untyped-call]
            self._ready.set()
            for entry in m.listen():
                if self._stop.is_set():
                    return
                if entry.get("client_type") == "lua":
                    continue
                self.counts[str(entry["command"]).split(" ", 1)[0].lower()] += 1

    def stop(self) -> Counter[str]:
        self._stop.set()
        with redis.Redis.from_url(self._url) as waker:
            waker.ping()  # a command for the listener to see, so it notices the stop
        self._thread.join(5)
        return self.counts


@pytest.mark.parametrize("event_type", ["demo.noop", "io.guarded_noop"])
def test_an_event_costs_at_most_three_and_a_half_round_trips(
    server: EmbeddedServer, tmp_path: Path, event_type: str,
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(CONFIG)
    stack = Stack(server.url, config, tmp_path)
    try:
        stack.start_worker("standard")
        time.sleep(1)
        idle = _Monitor(server.url)
        time.sleep(3)
        idle_per_s = sum(idle.stop().values()) / 3
        monitor = _Monitor(server.url)
        started = time.monotonic()
        results = stack.rt.publisher.publish_many(
            [{"type": event_type, "source": "count"} for _ in range(EVENTS)])
        assert all(r.outcome == "accepted" for r in results)
        wait_for(lambda: stack.state.llen("standard") == 0 and stack.state.hlen("unacked") == 0,
                 60, "every event handled and acknowledged", 0.05)
        elapsed_s = time.monotonic() - started
        counts = monitor.stop()
    finally:
        stack.stop()
    worker_trips = sum(counts.values()) - idle_per_s * elapsed_s - _publisher_trips(EVENTS)
    per_event = worker_trips / EVENTS
    print(f"round trips per event: {per_event:.2f} ({dict(counts)})")
    assert per_event <= MAX_ROUND_TRIPS_PER_EVENT


def _publisher_trips(events: int) -> int:
    """The test's own publish: one claim-and-push script per chunk of 1,000, an
    admission read, script loads."""
    return 10 + events // 1000
