"""One side of the isolation scenario (:mod:`bench.scenarios.isolation`): fill the
bulk queue, start the side's workers, send critical events while bulk works through
its backlog, stop the workers, and account for every event from the marks the
handlers (:mod:`bench.handlers`, :mod:`bench.stock_app`) wrote to Redis."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import percentile, start_worker, stop_worker
from bench.keys import BULK_DONE_KEY, STARTED_KEY

BUSY_TIMEOUT_S = 60.0  # bulk workers must have started working by then
PRIORITY_SUBQUEUES = range(1, 10)  # kombu's Redis priority sub-lists: "<queue>\x06\x16<n>"

Sent = tuple[str, str, float, float]  # (event id, "spaced" | "burst", sent at, send took s)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue``, priority sub-lists included."""
    pipe = client.pipeline()
    pipe.llen(queue)
    for n in PRIORITY_SUBQUEUES:
        pipe.llen(f"{queue}\x06\x16{n}")
    return sum(int(x) for x in pipe.execute())


def bulk_done(client: redis.Redis) -> int:
    return int(client.get(BULK_DONE_KEY) or 0)


def wait_busy(client: redis.Redis, slots: int) -> None:
    """Until every bulk slot has handled at least one event (so all of them are busy)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while bulk_done(client) < slots:
        if time.monotonic() > deadline:
            raise RuntimeError("bulk workers did not start working")
        time.sleep(0.01)


def send_critical(send: Callable[[str], None], args: argparse.Namespace) -> list[Sent]:
    """Critical events, spaced every ``interval_ms`` with a burst every ``burst_every_s``."""
    sent: list[Sent] = []
    interval = args.interval_ms / 1000
    ticks = int(args.window_s / interval)
    burst_every = max(1, round(args.burst_every_s / interval))
    start = time.monotonic()
    for k in range(ticks):
        pause = start + k * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        burst = k % burst_every == burst_every // 2
        for _ in range(args.burst_size if burst else 1):
            event_id = str(uuid.uuid4())
            at = time.time()
            send(event_id)
            sent.append((event_id, "burst" if burst else "spaced", at, time.time() - at))
    return sent


def wait_started(client: redis.Redis, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while client.hlen(STARTED_KEY) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {client.hlen(STARTED_KEY)} of {n} critical events "
                                 f"started within {timeout_s:.0f}s")
        time.sleep(0.05)


def measure(client: redis.Redis, sent: list[Sent], window: tuple[float, int, float, int],
            backlog: int, queues: list[str], held_max: int) -> dict[str, Any]:
    """Latencies and bulk throughput of one side; asserts every event is accounted for."""
    raw: dict[bytes, bytes] = client.hgetall(STARTED_KEY)  # type: ignore[assignment]
    started = {k.decode(): float(v) for k, v in raw.items()}
    ids = {event_id for event_id, _, _, _ in sent}
    assert len(ids) == len(sent), "duplicate critical event ids"
    assert set(started) == ids, (f"critical events: {len(ids)} sent, {len(started)} started, "
                                 f"{len(set(started) - ids)} unknown")
    lat = {kind: [(started[i] - at) * 1000 for i, k, at, _ in sent if k == kind]
           for kind in ("spaced", "burst")}
    every = lat["spaced"] + lat["burst"]
    send_ms = [took * 1000 for _, _, _, took in sent]
    done = bulk_done(client)
    queued = sum(queue_depth(client, q) for q in queues)
    unacked = int(client.hlen("unacked"))
    # Nothing may be lost. An event handled just as its worker got SIGTERM can also be
    # back on the queue (at-least-once: acked late, restored by the warm shutdown), so
    # the count may exceed the backlog by at most what the workers held.
    counted = done + queued + unacked
    assert backlog <= counted <= backlog + held_max, (
        f"bulk events unaccounted for: {done} handled + {queued} queued + {unacked} unacked "
        f"= {counted}, expected {backlog} (+ at most {held_max} redelivered)")
    t0, done0, t1, done1 = window
    return {
        "critical_events": len(sent),
        "critical_ms": {"p50": percentile(every, 0.5), "p99": percentile(every, 0.99),
                        "max": max(every)},
        "critical_ms_spaced": {"p50": percentile(lat["spaced"], 0.5),
                               "p99": percentile(lat["spaced"], 0.99)},
        "critical_ms_burst": {"p50": percentile(lat["burst"], 0.5),
                              "p99": percentile(lat["burst"], 0.99)},
        # the send call alone (publish / send_task), part of the latency above
        "send_ms": {"p50": percentile(send_ms, 0.5), "p99": percentile(send_ms, 0.99)},
        "bulk_events_per_s": (done1 - done0) / (t1 - t0),
        "bulk": {"backlog": backlog, "handled": done, "queued": queued, "unacked": unacked},
        # for the chart: (seconds since the first send, latency ms, kind)
        "samples": [[round(at - sent[0][2], 4), round((started[i] - at) * 1000, 3), kind]
                    for i, kind, at, _ in sent],
    }


def run_side(client: redis.Redis, args: argparse.Namespace, *, fill: Callable[[], None],
             workers: list[tuple[list[str], dict[str, str], str]],
             send: Callable[[str], None], queues: list[str], tmp: Path,
             wait_s: float) -> dict[str, Any]:
    """Fill the bulk queue, start the workers, send critical events, stop, account."""
    client.flushdb()
    fill()
    procs = []
    try:
        for argv, env, name in workers:
            procs.append(start_worker(argv, env, tmp / f"{name}.log"))
        wait_busy(client, args.slots - args.critical_slots)
        t0, done0 = time.monotonic(), bulk_done(client)
        sent = send_critical(send, args)
        t1, done1 = time.monotonic(), bulk_done(client)
        wait_started(client, len(sent), wait_s)
    finally:
        for proc in procs:
            stop_worker(proc)
    return measure(client, sent, (t0, done0, t1, done1), args.backlog, queues,
                   held_max=args.slots * args.prefetch)


def stock_argv(queue: str, slots: int, prefetch: int, name: str) -> list[str]:
    """A stock Celery worker with task events on (-E), as the pipeline's tiers send them
    and as a team running Flower runs its workers: both sides pay for them."""
    return [sys.executable, "-m", "celery", "-A", "bench.stock_app", "worker", "-Q", queue,
            "-c", str(slots), "--prefetch-multiplier", str(prefetch), "-n", f"{name}@%h",
            "-l", "INFO", "-E", "--without-gossip", "--without-mingle"]
