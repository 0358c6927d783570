"""Prefork soft time limits arriving at any moment of a job (SIGUSR1 sent at random to
the pool's children, hundreds of times): only handlers are interrupted. Every event
settles once, succeeded or dead-lettered; no settle is cut and requeued, no attempt
runs twice, none is counted lost."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import cast

import pytest

from pipeline.core.state import Keys
from tests.integration.support import IO_MODULES, Stack, Worker, wait_for, write_config

TIERS = """
[tiers.single]
queue = "sig-single"
concurrency = 2
prefetch_multiplier = 2
max_retries = 12
backoff_base_s = 0.02
backoff_max_s = 0.05
retry_budget_ratio = 0
soft_time_limit_s = 8
time_limit_s = 9

[tiers.batched]
queue = "sig-batched"
concurrency = 2
prefetch_multiplier = 2
batch_size = 20
max_retries = 12
backoff_base_s = 0.02
backoff_max_s = 0.05
retry_budget_ratio = 0
soft_time_limit_s = 8
time_limit_s = 9
"""
EVENTS = 300  # per tier and wave
MAX_WAVES = 20  # of EVENTS each, sent until SIGNALS_MIN signals were sent
SIGNALS_MIN = 200  # soft-limit signals sent while the waves ran
SIGNAL_GAP_S = (0.001, 0.008)  # between two soft-limit signals to a child


@pytest.fixture(scope="module", params=["single", "batched"])
def stack(request: pytest.FixtureRequest, redis_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    tier = request.param
    tmp = tmp_path_factory.mktemp(f"softsig-{tier}")
    config = write_config(tmp / "pipeline.toml", prefix="sig-", extra=TIERS,
                          handler_modules=IO_MODULES)
    s = Stack(redis_url, config, tmp)
    try:
        s.start_worker(tier)
        yield s, tier
    finally:
        s.stop()


def send_soft_limits(worker: Worker, stop: threading.Event, sent: list[int]) -> None:
    rng = random.Random()
    while not stop.wait(rng.uniform(*SIGNAL_GAP_S)):
        for pid in worker.child_pids():
            try:
                os.kill(pid, signal.SIGUSR1)
                sent.append(pid)
            except ProcessLookupError:
                pass


def test_soft_limits_at_random_moments_interrupt_only_handlers(
    stack: tuple[Stack, str],
) -> None:
    s, tier = stack
    (worker,) = s.workers
    task_ids: dict[str, str] = {}
    sent: list[int]
    stop, sent = threading.Event(), []
    sender = threading.Thread(target=send_soft_limits, args=(worker, stop, sent))
    sender.start()

    def dead() -> set[str]:
        return {r.event_id for r in s.rt.dlq.iter_records() if r.event_id in task_ids}

    def settled() -> int:
        done = sum(1 for t in task_ids.values() if s.state.exists(Keys.done(t)))
        return done + len(dead())

    try:  # a fast tier settles a wave in a fraction of a second: more waves, until the
        # signals that arrived while work was running are many
        for _ in range(MAX_WAVES):
            wave = [{"id": str(uuid.uuid4()), "type": "io.mark", "source": "tests",
                     "tier": tier} for _ in range(EVENTS)]
            results = s.rt.publisher.publish_many(wave)
            assert all(r.outcome == "accepted" for r in results)
            task_ids.update({e["id"]: r.task_ids[0]
                             for e, r in zip(wave, results, strict=True)})
            wait_for(lambda: settled() >= len(task_ids), 240, "every event to settle", 0.05)
            if len(sent) > SIGNALS_MIN:
                break
    finally:
        stop.set()
        sender.join()
    assert len(sent) > SIGNALS_MIN  # the fault was injected, often

    log = worker.log()
    soft_failures = len(re.findall(r"failed \(SoftTimeLimitExceeded", log))
    assert soft_failures > 0  # and it interrupted handlers
    for bad in ("could not settle", "requeueing", "WorkerLost", "never settled"):
        assert bad not in log, bad

    dlq = dead()
    for event_id, task_id in task_ids.items():  # succeeded xor dead-lettered
        assert s.state.exists(Keys.done(task_id)) != (event_id in dlq), event_id
    raw = cast(dict[bytes, bytes], s.state.hgetall(Keys.demo_effects()))
    runs = {k.decode(): int(v) for k, v in raw.items() if k.decode().split(":")[0] in task_ids}
    assert runs
    assert max(runs.values()) == 1  # no attempt of any event ran twice
