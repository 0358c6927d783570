"""What many attempts share in one process (threads and gevent pools) stays per attempt."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import structlog

from pipeline.config.load import load_settings
from pipeline.core import logs
from pipeline.core.names import TASK_NAME
from pipeline.core.tiers import TierConfig
from pipeline.worker.batch import RateGate, _rate_gate
from pipeline.worker.runtime import Runtime

THREADS = 16  # attempts running at once in one process


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure(logging.INFO, stream)
    logs.install()
    yield stream
    if logs._handler is not None:
        logging.getLogger().removeHandler(logs._handler)
        logs._handler = None
    structlog.reset_defaults()


def run_attempt(n: int, barrier: threading.Barrier, after: dict[int, dict[str, object]]) -> None:
    task = SimpleNamespace(name=TASK_NAME)
    logs._bind_task(task_id=f"t-{n}", task=task, args=[{"id": f"e-{n}", "type": "x.y"}],
                    kwargs={"tier": "io", "handler": "h", "attempt": 1})
    barrier.wait()  # every thread has bound its fields before any logs
    logging.getLogger("handler").info("attempt %d", n)
    barrier.wait()  # every thread has logged before any unbinds
    logs._unbind_task(task=task)
    after[n] = structlog.contextvars.get_contextvars()


def test_log_fields_of_attempts_running_at_once_in_threads_stay_their_own(
    json_lines: io.StringIO,
) -> None:
    barrier = threading.Barrier(THREADS)
    after: dict[int, dict[str, object]] = {}
    threads = [threading.Thread(target=run_attempt, args=(n, barrier, after))
               for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    docs = [json.loads(line) for line in json_lines.getvalue().splitlines()]
    assert len(docs) == THREADS
    for doc in docs:
        n = int(doc["message"].split()[-1])
        assert (doc["task_id"], doc["event_id"]) == (f"t-{n}", f"e-{n}")
    assert all(not fields for fields in after.values())  # nothing left for the next task


def test_a_runtime_object_asked_for_by_many_threads_at_once_is_made_once() -> None:
    runtime = Runtime(SimpleNamespace(), load_settings())  # type: ignore[arg-type]
    made: list[object] = []
    barrier = threading.Barrier(THREADS)

    def make() -> object:
        time.sleep(0.01)  # long enough for every thread to arrive while it is made
        made.append(object())
        return made[-1]

    def ask(results: list[object]) -> None:
        barrier.wait()
        results.append(runtime._once("_ledger", make))

    results: list[object] = []
    threads = [threading.Thread(target=ask, args=(results,)) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1
    assert all(r is made[0] for r in results)


def test_a_rate_gate_shared_by_threads_lets_through_no_more_than_its_rate() -> None:
    gate = RateGate(50.0)  # one every 20 ms
    passed: list[float] = []
    started = time.monotonic()

    def go() -> None:
        for _ in range(5):
            gate.wait()
            passed.append(time.monotonic())

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(passed) == 20
    assert max(passed) - started >= 19 * 0.02 * 0.9  # 20 passes at 50/s, one at once


@pytest.mark.parametrize(("pool", "per_s"), [("prefork", 100 / 4), ("threads", 100.0),
                                             ("gevent", 100.0)])
def test_a_batched_tiers_rate_limit_is_shared_over_processes_not_threads(
    pool: str, per_s: float,
) -> None:
    tier = TierConfig(pool=pool, concurrency=4, rate_limit="100/s",
                      accept_unenforced_time_limit=True)
    rt = SimpleNamespace(settings=SimpleNamespace(tiers={f"rl-{pool}": tier}))
    gate = _rate_gate(rt, f"rl-{pool}")  # type: ignore[arg-type]
    assert gate is not None
    assert gate._bucket.fill_rate == pytest.approx(per_s)
