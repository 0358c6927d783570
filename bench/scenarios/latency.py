"""End-to-end latency at steady load: publish to handler start, four tiers.

Two sides on the same own broker (flushed in between), each with one worker per
tier with the shipped tiers' concurrency and prefetch multiplier, task events on:

* **pipeline**: ``pipeline worker --tier <tier>`` for critical, high, standard and
  bulk, handler ``bench.mark`` (:mod:`bench.handlers`), idempotency and metrics on;
* **stock**: ``celery -A bench.stock_app worker -Q <tier> -E``, one queue per tier,
  task ``stock.mark``: the same Redis write.

Events arrive at ``--rate`` per second for ``--duration-s``, round-robin over the
tiers; latency is from just before the send call to the handler's start (the
handler writes its start time to Redis). Every event must start exactly once.
Sides alternate ``--repeats`` times; the figures are medians of the repeats.

    python -m bench latency [--quick] [--rate 200] [--duration-s 60] [--repeats 3]
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
    median,
    own_broker,
    percentile,
    start_workers,
    stop_worker,
    versions,
    write_results,
)
from bench.keys import STARTED_KEY, STARTS_KEY

TARGET_P99_RATIO = 1.5  # pipeline p99 at most this many times stock Celery's
TIERS = ("critical", "high", "standard", "bulk")
DRAIN_TIMEOUT_S = 60.0  # every event must have started this long after the last send

Sent = tuple[str, str, float]  # (event id, tier, sent at epoch s)


def send_steady(send: Callable[[str, str], None], rate: float, duration_s: float) -> list[Sent]:
    """``rate`` events per second for ``duration_s``, round-robin over the tiers."""
    sent: list[Sent] = []
    interval = 1.0 / rate
    start = time.monotonic()
    for k in range(int(rate * duration_s)):
        pause = start + k * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        event_id, tier = str(uuid.uuid4()), TIERS[k % len(TIERS)]
        at = time.time()
        send(event_id, tier)
        sent.append((event_id, tier, at))
    return sent


def latencies(client: redis.Redis, sent: list[Sent]) -> dict[str, Any]:
    """p50/p99 per tier and overall (ms); asserts each event started exactly once."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while client.hlen(STARTED_KEY) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    raw: dict[bytes, bytes] = client.hgetall(STARTED_KEY)  # type: ignore[assignment]
    started = {k.decode(): float(v) for k, v in raw.items()}
    counts: dict[bytes, bytes] = client.hgetall(STARTS_KEY)  # type: ignore[assignment]
    ids = {event_id for event_id, _, _ in sent}
    assert set(started) == ids, f"{len(ids)} sent, {len(started)} started"
    twice = [k for k, v in counts.items() if int(v) != 1]
    assert not twice, f"{len(twice)} events started more than once"
    ms = {tier: [(started[i] - at) * 1000 for i, t, at in sent if t == tier]
          for tier in TIERS}
    every = [x for values in ms.values() for x in values]
    return {"events": len(sent), "ms": {"p50": percentile(every, 0.5),
                                        "p99": percentile(every, 0.99), "max": max(every)},
            "ms_by_tier": {t: {"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
                           for t, v in ms.items()}}


def run_side(client: redis.Redis, workers: list[tuple[list[str], dict[str, str], Path]],
             send: Callable[[str, str], None], args: argparse.Namespace) -> dict[str, Any]:
    client.flushdb()
    procs = start_workers(workers)
    try:
        time.sleep(1.0)  # let every pool process take its first fetch
        sent = send_steady(send, args.rate, args.duration_s)
        return latencies(client, sent)
    finally:
        for proc in procs:
            stop_worker(proc)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench latency")
    parser.add_argument("--quick", action="store_true",
                        help="100 events/s for 10 s, 1 repeat; results in bench/results/quick/")
    parser.add_argument("--rate", type=float, help="events per second (default 200)")
    parser.add_argument("--duration-s", type=float, help="seconds of sending (default 60)")
    parser.add_argument("--repeats", type=int, help="runs per side (default 3)")
    args = parser.parse_args(argv)
    args.rate = args.rate or (100.0 if args.quick else 200.0)
    args.duration_s = args.duration_s or (10.0 if args.quick else 60.0)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    runs: dict[str, list[dict[str, Any]]] = {"pipeline": [], "stock": []}
    with logs_kept_on_failure(tmp), own_broker() as server:
        sides = _Sides(server.url, tmp)
        for rep in range(args.repeats):
            for side in ("stock", "pipeline"):
                if side == "stock":
                    workers, send = sides.stock_workers(rep), sides.stock_send
                else:
                    workers, send = sides.pipeline_workers(rep), sides.pipeline_send
                runs[side].append(run_side(sides.client, workers, send, args))
                r = runs[side][-1]
                print(f"repeat {rep + 1} {side}: {r['events']:,} events, p50 "
                      f"{r['ms']['p50']:.1f} ms, p99 {r['ms']['p99']:.1f} ms", flush=True)
        machine = versions(server.url)
        sides.client.close()
    return report(args, runs, machine)


class _Sides:
    """Both sides on one broker: how each sends an event and which workers it runs."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url, self.tmp = url, tmp
        self.base = clean_env()
        self.pipeline_env = {"PIPELINE_BROKER_URL": url,
                             "PIPELINE_HANDLER_MODULES": '["bench.handlers"]'}
        os.environ.update(self.pipeline_env)
        from pipeline.app import create_app
        from pipeline.config.load import load_settings
        from pipeline.worker.runtime import runtime_for

        self.settings = load_settings()
        self.publisher = runtime_for(create_app(self.settings, main="bench-latency")).publisher
        from bench.stock_app import app as stock

        stock.conf.update(broker_url=url)
        self.stock = stock
        self.client = redis.Redis.from_url(url)

    def pipeline_send(self, event_id: str, tier: str) -> None:
        result = self.publisher.publish({"id": event_id, "type": "bench.mark",
                                         "source": "bench", "tier": tier, "payload": {}})
        assert result.outcome == "accepted", result

    def stock_send(self, event_id: str, tier: str) -> None:
        self.stock.send_task("stock.mark", args=({"id": event_id},), queue=tier)

    def pipeline_workers(self, rep: int) -> list[tuple[list[str], dict[str, str], Path]]:
        specs = []
        for tier in TIERS:
            metrics_dir = self.tmp / f"metrics-{tier}"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir()
            env = {**self.base, **self.pipeline_env,
                   "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
            specs.append(([sys.executable, "-m", "pipeline", "worker", "--tier", tier,
                           "--without-gossip", "--without-mingle"], env,
                          self.tmp / f"pipeline-{tier}-{rep}.log"))
        return specs

    def stock_workers(self, rep: int) -> list[tuple[list[str], dict[str, str], Path]]:
        specs = []
        for tier in TIERS:
            conf = self.settings.tier(tier)
            specs.append(([sys.executable, "-m", "celery", "-A", "bench.stock_app",
                           "worker", "-Q", tier, "-c", str(conf.concurrency),
                           "--prefetch-multiplier", str(conf.prefetch_multiplier),
                           "-E", "-n", f"{tier}@%h", "-l", "INFO",
                           "--without-gossip", "--without-mingle"],
                          {**self.base, "BENCH_BROKER_URL": self.url},
                          self.tmp / f"stock-{tier}-{rep}.log"))
        return specs


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           machine: dict[str, Any]) -> int:
    med = {side: {q: median([r["ms"][q] for r in rs]) for q in ("p50", "p99")}
           for side, rs in runs.items()}
    ratio = med["pipeline"]["p99"] / med["stock"]["p99"]
    checks = [{"name": "pipeline p99 / stock Celery p99, publish to handler start",
               "value": ratio, "op": "<=", "target": TARGET_P99_RATIO,
               "met": ratio <= TARGET_P99_RATIO}]
    for side, m in med.items():
        print(f"{side}: p50 {m['p50']:.1f} ms, p99 {m['p99']:.1f} ms (median of "
              f"{len(runs[side])})")
    for c in checks:
        print(f"  {c['name']}: {c['value']:.2f} (target {c['op']} {c['target']:g}: "
              f"{'met' if c['met'] else 'MISSED'})")
    path = write_results("latency", {
        "quick": args.quick, "rate": args.rate, "duration_s": args.duration_s,
        "repeats": args.repeats, "tiers": list(TIERS), "ms_median": med, "ratio": ratio,
        "runs": runs, "checks": checks}, quick=args.quick, machine=machine)
    print(f"results: {path}")
    return 0
