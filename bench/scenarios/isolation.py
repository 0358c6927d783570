"""Head-of-line isolation: critical latency while bulk holds a large backlog.

Three sides in one run, each on the same own broker (flushed in between), the
same total worker slots (``--slots``) and the same work:

* **shared**: Celery's default layout: plain tasks, one queue, one worker with
  all the slots (default prefetch multiplier 4); critical tasks queue behind
  the bulk backlog.
* **tiered**: the pipeline: ``pipeline worker --tier critical`` (``--critical-slots``)
  and ``pipeline worker --tier bulk`` (the rest), handlers from
  :mod:`bench.handlers`, idempotency and metrics on.
* **bare**: the hand-made Celery answer: a plain task on its own queue and worker
  (``--critical-slots``) next to a plain bulk worker (the rest), same backlog.
  The latency floor the tiered side is held against.

Each side pre-fills the bulk queue with ``--backlog`` events whose handler
sleeps ``--bulk-ms`` (every bulk slot stays busy), starts its workers, then
sends critical events every ``--interval-ms`` and, every ``--burst-every-s``,
a burst of ``--burst-size``, for ``--window-s``. Critical latency is from just
before the send call to the handler's start (the handler writes its start time
to Redis). Bulk throughput is bulk events handled per second during the window.
After the workers' warm shutdown every event is accounted for: each critical
event started exactly once, and bulk handled + still queued == backlog.

    python -m bench isolation [--quick] [--backlog 100000] [--window-s 30] ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    clean_env,
    logs_kept_on_failure,
    own_broker,
    percentile,
    results_dir,
    start_worker,
    stop_worker,
    versions,
    write_results,
)
from bench.keys import BULK_DONE_KEY, STARTED_KEY

TARGET_VS_SHARED = 1000.0  # tiered critical p99 at least this many times better than shared
TARGET_VS_BARE = 2.0  # tiered critical p99 at most this many times the bare task's
SEND_CHUNK = 5000  # bulk events per publish_many call while pre-filling
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
    return [sys.executable, "-m", "celery", "-A", "bench.stock_app", "worker", "-Q", queue,
            "-c", str(slots), "--prefetch-multiplier", str(prefetch), "-n", f"{name}@%h",
            "-l", "INFO", "--without-gossip", "--without-mingle"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench isolation")
    parser.add_argument("--quick", action="store_true",
                        help="5,000-event backlog, 4 s window; results in bench/results/quick/")
    parser.add_argument("--backlog", type=int, help="bulk events queued (default 100,000)")
    parser.add_argument("--window-s", type=float, help="how long critical events arrive "
                        "(default 30)")
    parser.add_argument("--bulk-ms", type=float, default=5.0)
    parser.add_argument("--slots", type=int, default=4, help="worker slots in all, per side")
    parser.add_argument("--critical-slots", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--burst-every-s", type=float, default=2.0)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--sides", default="shared,tiered,bare",
                        help="comma-separated subset of shared,tiered,bare (all for ratios)")
    parser.add_argument("--prefetch", type=int, default=4,
                        help="prefetch multiplier of the shared and bulk workers (Celery's 4)")
    args = parser.parse_args(argv)
    args.backlog = args.backlog or (5_000 if args.quick else 100_000)
    args.window_s = args.window_s or (4.0 if args.quick else 30.0)
    bulk_slots = args.slots - args.critical_slots
    assert bulk_slots >= 1, "--slots must exceed --critical-slots"
    # the shared side drains the whole backlog before its last critical event runs
    wait_s = 120 + 3 * args.backlog * args.bulk_ms / 1000 / bulk_slots
    isolated_wait_s = 60.0  # the tiered and bare sides: critical never waits behind bulk
    tmp = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    sides: dict[str, dict[str, Any]] = {}
    with logs_kept_on_failure(tmp), own_broker() as server:
        url = server.url
        base = clean_env()
        pipeline_env = {
            "PIPELINE_BROKER_URL": url,
            "PIPELINE_HANDLER_MODULES": '["bench.handlers"]',
            "PIPELINE_TIERS__CRITICAL__CONCURRENCY": str(args.critical_slots),
            "PIPELINE_TIERS__CRITICAL__PREFETCH_MULTIPLIER": "1",
            "PIPELINE_TIERS__BULK__CONCURRENCY": str(bulk_slots),
            "PIPELINE_TIERS__BULK__PREFETCH_MULTIPLIER": str(args.prefetch),
            "PIPELINE_TIERS__BULK__BATCH_SIZE": "0",
            "PIPELINE_TIERS__BULK__MAX_DEPTH": "0",
        }
        stock_env = {**base, "BENCH_BROKER_URL": url}
        os.environ.update(pipeline_env)  # the publisher in this process loads them too
        from pipeline.app import create_app
        from pipeline.config import load_settings
        from pipeline.runtime import runtime_for

        publisher = runtime_for(create_app(load_settings(), main="bench-iso")).publisher
        from bench.stock_app import app as stock

        stock.conf.update(broker_url=url)
        client = redis.Redis.from_url(url)
        payload = {"ms": args.bulk_ms}

        def stock_fill(queue: str) -> Callable[[], None]:
            def fill() -> None:
                with stock.producer_or_acquire() as producer:
                    for i in range(args.backlog):
                        stock.send_task("stock.bulk", args=({"id": i, "payload": payload},),
                                        queue=queue, producer=producer)
            return fill

        def stock_send(queue: str) -> Callable[[str], None]:
            def send(event_id: str) -> None:
                stock.send_task("stock.critical", args=({"id": event_id},), queue=queue)
            return send

        def tiered_fill() -> None:
            for start in range(0, args.backlog, SEND_CHUNK):
                batch = [{"id": str(uuid.uuid4()), "type": "bench.bulk", "source": "bench",
                          "tier": "bulk", "payload": payload}
                         for _ in range(start, min(start + SEND_CHUNK, args.backlog))]
                results = publisher.publish_many(batch)
                assert all(r.outcome == "accepted" for r in results), results[:3]

        def tiered_send(event_id: str) -> None:
            result = publisher.publish({"id": event_id, "type": "bench.critical",
                                        "source": "bench", "tier": "critical",
                                        "payload": {}})
            assert result.outcome == "accepted", result

        def pipeline_worker(tier: str) -> tuple[list[str], dict[str, str], str]:
            metrics_dir = tmp / f"metrics-{tier}"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()
            env = {**base, **pipeline_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
            return ([sys.executable, "-m", "pipeline", "worker", "--tier", tier,
                     "--without-gossip", "--without-mingle"], env, f"tiered-{tier}")

        plan: dict[str, Callable[[], dict[str, Any]]] = {
            "shared": lambda: run_side(
                client, args, fill=stock_fill("shared"),
                workers=[(stock_argv("shared", args.slots, args.prefetch, "shared"),
                          stock_env, "shared")],
                send=stock_send("shared"), queues=["shared"], tmp=tmp, wait_s=wait_s),
            "tiered": lambda: run_side(
                client, args, fill=tiered_fill,
                workers=[pipeline_worker("bulk"), pipeline_worker("critical")],
                send=tiered_send, queues=["bulk", "critical"], tmp=tmp,
                wait_s=isolated_wait_s),
            "bare": lambda: run_side(
                client, args, fill=stock_fill("bare_bulk"),
                workers=[(stock_argv("bare_bulk", bulk_slots, args.prefetch, "bulk"),
                          stock_env, "bare-bulk"),
                         (stock_argv("bare_critical", args.critical_slots, 1, "critical"),
                          stock_env, "bare-critical")],
                send=stock_send("bare_critical"), queues=["bare_bulk", "bare_critical"],
                tmp=tmp, wait_s=isolated_wait_s),
        }
        for name in args.sides.split(","):
            run = plan[name]
            print(f"{name}: {args.backlog:,} bulk events queued, critical events for "
                  f"{args.window_s:g}s ...", flush=True)
            sides[name] = run()
            s = sides[name]
            print(f"  critical p50 {s['critical_ms']['p50']:,.1f} ms, p99 "
                  f"{s['critical_ms']['p99']:,.1f} ms ({s['critical_events']} events; "
                  f"the send call p50 {s['send_ms']['p50']:.2f} ms); "
                  f"bulk {s['bulk_events_per_s']:,.0f}/s; bulk accounted: "
                  f"{s['bulk']['handled']:,} handled + {s['bulk']['queued']:,} queued",
                  flush=True)
        machine = versions(url)
        client.close()
    if set(sides) != set(plan):
        return 0  # a subset: no ratios, no results file
    p99 = {name: s["critical_ms"]["p99"] for name, s in sides.items()}
    vs_shared = p99["shared"] / p99["tiered"]
    vs_bare = p99["tiered"] / p99["bare"]
    spaced = {name: s["critical_ms_spaced"]["p99"] for name, s in sides.items()}
    checks = [
        {"name": "tiered critical p99 vs shared (x better)", "value": vs_shared,
         "op": ">=", "target": TARGET_VS_SHARED, "met": vs_shared >= TARGET_VS_SHARED},
        {"name": "tiered critical p99 / bare task p99", "value": vs_bare,
         "op": "<=", "target": TARGET_VS_BARE, "met": vs_bare <= TARGET_VS_BARE},
    ]
    print(f"\ncritical p99: shared {p99['shared']:,.1f} ms, tiered {p99['tiered']:,.1f} ms, "
          f"bare {p99['bare']:,.1f} ms (spaced events alone: shared {spaced['shared']:,.1f}, "
          f"tiered {spaced['tiered']:,.1f}, bare {spaced['bare']:,.1f} ms)")
    for c in checks:
        print(f"  {c['name']}: {c['value']:,.2f} (target {c['op']} {c['target']:g}: "
              f"{'met' if c['met'] else 'MISSED'})")
    path = write_results("isolation", {
        "quick": args.quick, "backlog": args.backlog, "window_s": args.window_s,
        "bulk_ms": args.bulk_ms, "slots": args.slots, "critical_slots": args.critical_slots,
        "interval_ms": args.interval_ms, "burst_every_s": args.burst_every_s,
        "burst_size": args.burst_size, "prefetch": args.prefetch,
        "ratios": {"tiered_vs_shared_p99": vs_shared, "tiered_over_bare_p99": vs_bare,
                   "tiered_vs_shared_p99_spaced": spaced["shared"] / spaced["tiered"],
                   "tiered_over_bare_p99_spaced": spaced["tiered"] / spaced["bare"]},
        "checks": checks, "sides": sides}, quick=args.quick, machine=machine)
    print(f"results: {path}")
    from bench.charts import render

    print(f"chart: {render('isolation', results_dir(args.quick))}")
    return 0
