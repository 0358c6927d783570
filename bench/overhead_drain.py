"""One worker draining a pre-filled queue, for the overhead scenario
(:mod:`bench.scenarios.overhead`): seconds from "ready" to the queue drained and
acked, the CPU the worker and the broker used meanwhile, and RSS samples."""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import redis

from bench.common import cpu_s, rss_kb, start_worker, stop_worker

RSS_EVERY_S = 0.5  # RSS sampling period


def depth(client: redis.Redis, queue: str) -> int:
    return int(client.llen(queue)) + int(client.hlen("unacked"))


class Drain(NamedTuple):
    seconds: float  # from the worker's "ready" to the queue drained and acked
    cpu_s: float  # CPU seconds meanwhile: worker main + pool processes + broker server
    samples: list[list[float]]  # RSS: [fraction handled, main kB, children kB, seconds]


def drain(argv: list[str], env: dict[str, str], client: redis.Redis, queue: str, log: Path,
          total: int, broker_pid: int, sample: bool = False) -> Drain:
    """Start a worker and time it draining ``queue``, with the CPU it and the broker
    used, and RSS samples when ``sample``."""
    proc = start_worker(argv, env, log)
    samples: list[list[float]] = []
    try:
        cpu_before = cpu_s(proc.pid) + cpu_s(broker_pid, with_children=False)
        started = time.perf_counter()
        next_sample = 0.0
        while left := depth(client, queue):
            now = time.perf_counter() - started
            if sample and now >= next_sample:
                sizes = rss_kb(proc.pid)
                main = sizes.pop(str(proc.pid), 0)
                samples.append([(total - left) / total, main, sum(sizes.values()), now])
                next_sample = now + RSS_EVERY_S
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        cpu = cpu_s(proc.pid) + cpu_s(broker_pid, with_children=False) - cpu_before
        if sample:
            sizes = rss_kb(proc.pid)
            main = sizes.pop(str(proc.pid), 0)
            samples.append([1.0, main, sum(sizes.values()), seconds])
        return Drain(seconds, cpu, samples)
    finally:
        stop_worker(proc)
