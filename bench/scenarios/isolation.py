"""Head-of-line isolation: critical latency while bulk holds a large backlog.

Three sides in one run, each on the same own broker (flushed in between), the
same total worker slots (``--slots``), the same work and task events on (stock
workers run with ``-E``, as the tiers send them):

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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    clean_env,
    logs_kept_on_failure,
    own_broker,
    results_dir,
    versions,
    write_results,
)
from bench.isolation_sides import run_side, stock_argv

TARGET_VS_SHARED = 1000.0  # tiered critical p99 at least this many times better than shared
TARGET_VS_BARE = 1.5  # tiered critical p99 at most this many times the bare task's (issue 14)
SEND_CHUNK = 5000  # bulk events per publish_many call while pre-filling
ISOLATED_WAIT_S = 60.0  # the tiered and bare sides: critical never waits behind bulk


def parse(argv: list[str]) -> argparse.Namespace:
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
    assert args.slots - args.critical_slots >= 1, "--slots must exceed --critical-slots"
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    sides: dict[str, dict[str, Any]] = {}
    with logs_kept_on_failure(tmp), own_broker() as server:
        plan = _Sides(args, server.url, tmp)
        for name in args.sides.split(","):
            run = plan.runs[name]
            print(f"{name}: {args.backlog:,} bulk events queued, critical events for "
                  f"{args.window_s:g}s ...", flush=True)
            sides[name] = run()
            _print_side(sides[name])
        machine = versions(server.url)
        plan.client.close()
    if set(sides) != set(plan.runs):
        return 0  # a subset: no ratios, no results file
    return report(args, sides, machine)


class _Sides:
    """The three sides on one broker: how each fills the bulk queue, sends a critical
    event and runs its workers; ``runs[name]()`` runs one side and accounts for it."""

    def __init__(self, args: argparse.Namespace, url: str, tmp: Path) -> None:
        self.args, self.tmp = args, tmp
        self.bulk_slots = args.slots - args.critical_slots
        self.base = clean_env()
        self.pipeline_env = {
            "PIPELINE_BROKER_URL": url,
            "PIPELINE_HANDLER_MODULES": '["bench.handlers"]',
            "PIPELINE_TIERS__CRITICAL__CONCURRENCY": str(args.critical_slots),
            "PIPELINE_TIERS__CRITICAL__PREFETCH_MULTIPLIER": "1",
            "PIPELINE_TIERS__BULK__CONCURRENCY": str(self.bulk_slots),
            "PIPELINE_TIERS__BULK__PREFETCH_MULTIPLIER": str(args.prefetch),
            "PIPELINE_TIERS__BULK__BATCH_SIZE": "0",
            "PIPELINE_TIERS__BULK__MAX_DEPTH": "0",
        }
        self.stock_env = {**self.base, "BENCH_BROKER_URL": url}
        os.environ.update(self.pipeline_env)  # the publisher in this process loads them too
        from pipeline.app import create_app
        from pipeline.config.load import load_settings
        from pipeline.worker.runtime import runtime_for

        self.publisher = runtime_for(create_app(load_settings(), main="bench-iso")).publisher
        from bench.stock_app import app as stock

        stock.conf.update(broker_url=url)
        self.stock = stock
        self.client = redis.Redis.from_url(url)
        self.payload = {"ms": args.bulk_ms}
        self.runs: dict[str, Callable[[], dict[str, Any]]] = {
            "shared": self.shared, "tiered": self.tiered, "bare": self.bare}

    def shared(self) -> dict[str, Any]:
        args = self.args
        # the shared side drains the whole backlog before its last critical event runs
        wait_s = 120 + 3 * args.backlog * args.bulk_ms / 1000 / self.bulk_slots
        return run_side(
            self.client, args, fill=self.stock_fill("shared"),
            workers=[(stock_argv("shared", args.slots, args.prefetch, "shared"),
                      self.stock_env, "shared")],
            send=self.stock_send("shared"), queues=["shared"], tmp=self.tmp, wait_s=wait_s)

    def tiered(self) -> dict[str, Any]:
        return run_side(
            self.client, self.args, fill=self.tiered_fill,
            workers=[self.pipeline_worker("bulk"), self.pipeline_worker("critical")],
            send=self.tiered_send, queues=["bulk", "critical"], tmp=self.tmp,
            wait_s=ISOLATED_WAIT_S)

    def bare(self) -> dict[str, Any]:
        args = self.args
        return run_side(
            self.client, args, fill=self.stock_fill("bare_bulk"),
            workers=[(stock_argv("bare_bulk", self.bulk_slots, args.prefetch, "bulk"),
                      self.stock_env, "bare-bulk"),
                     (stock_argv("bare_critical", args.critical_slots, 1, "critical"),
                      self.stock_env, "bare-critical")],
            send=self.stock_send("bare_critical"), queues=["bare_bulk", "bare_critical"],
            tmp=self.tmp, wait_s=ISOLATED_WAIT_S)

    def stock_fill(self, queue: str) -> Callable[[], None]:
        def fill() -> None:
            with self.stock.producer_or_acquire() as producer:
                for i in range(self.args.backlog):
                    self.stock.send_task("stock.bulk", args=({"id": i, "payload": self.payload},),
                                         queue=queue, producer=producer)
        return fill

    def stock_send(self, queue: str) -> Callable[[str], None]:
        def send(event_id: str) -> None:
            self.stock.send_task("stock.critical", args=({"id": event_id},), queue=queue)
        return send

    def tiered_fill(self) -> None:
        backlog = self.args.backlog
        for start in range(0, backlog, SEND_CHUNK):
            batch = [{"id": str(uuid.uuid4()), "type": "bench.bulk", "source": "bench",
                      "tier": "bulk", "payload": self.payload}
                     for _ in range(start, min(start + SEND_CHUNK, backlog))]
            results = self.publisher.publish_many(batch)
            assert all(r.outcome == "accepted" for r in results), results[:3]

    def tiered_send(self, event_id: str) -> None:
        result = self.publisher.publish({"id": event_id, "type": "bench.critical",
                                         "source": "bench", "tier": "critical",
                                         "payload": {}})
        assert result.outcome == "accepted", result

    def pipeline_worker(self, tier: str) -> tuple[list[str], dict[str, str], str]:
        metrics_dir = self.tmp / f"metrics-{tier}"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        env = {**self.base, **self.pipeline_env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        return ([sys.executable, "-m", "pipeline", "worker", "--tier", tier,
                 "--without-gossip", "--without-mingle"], env, f"tiered-{tier}")


def _print_side(s: dict[str, Any]) -> None:
    print(f"  critical p50 {s['critical_ms']['p50']:,.1f} ms, p99 "
          f"{s['critical_ms']['p99']:,.1f} ms ({s['critical_events']} events; "
          f"the send call p50 {s['send_ms']['p50']:.2f} ms); "
          f"bulk {s['bulk_events_per_s']:,.0f}/s; bulk accounted: "
          f"{s['bulk']['handled']:,} handled + {s['bulk']['queued']:,} queued",
          flush=True)


def report(args: argparse.Namespace, sides: dict[str, dict[str, Any]],
           machine: dict[str, Any]) -> int:
    """Ratios and checks of the three sides, the results file and the chart."""
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
