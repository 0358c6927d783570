"""Worker throughput on a batched tier against stock Celery no-op tasks.

One worker (same pool, concurrency and acks_late) drains a pre-filled queue on
each side, in the same run: stock ``celery worker`` running a no-op task, and
``pipeline worker`` on a tier with ``batch_size`` running the no-op handler
``demo.noop`` (idempotency marks and metrics on). Reports events/s per worker,
the median of repeats and the ratio.

    python -m bench batch [--stock-events 10000] [--batch-events 100000]
                          [--batch-size 200] [--concurrency 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from bench.common import median, own_broker, start_worker, stop_worker, write_results
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.worker.runtime import runtime_for

# issue 14: the batched tier stays >= 25x stock Celery per worker (events/s, medians)
TARGET_RATIO = 25.0


def drain(argv: list[str], env: dict[str, str], url: str, queue: str, log: Path) -> float:
    """Start a worker, return seconds from ready to the queue drained and acked."""
    client = redis.Redis.from_url(url)
    proc = start_worker(argv, env, log)
    try:
        started = time.perf_counter()
        while client.llen(queue) or client.hlen("unacked"):
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        stop_worker(proc)
        client.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench batch")
    parser.add_argument("--stock-events", type=int, default=10_000)
    parser.add_argument("--batch-events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"stock_noop": [], "batched_tier": []}
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    with own_broker() as server:
        env = {**os.environ, "BENCH_BROKER_URL": server.url, "PIPELINE_BROKER_URL": server.url,
               "PIPELINE_HANDLER_MODULES": '["pipeline.demo"]',
               "PIPELINE_TIERS__BULK__BATCH_SIZE": str(args.batch_size),
               "PIPELINE_TIERS__BULK__CONCURRENCY": str(args.concurrency),
               "PIPELINE_TIERS__BULK__PREFETCH_MULTIPLIER": "4",
               "PIPELINE_TIERS__BULK__MAX_DEPTH": "0"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("PIPELINE_")})
        publisher = runtime_for(create_app(load_settings(), main="bench-batch")).publisher
        from bench.stock_app import app as stock

        stock.conf.update(broker_url=server.url)
        client = redis.Redis.from_url(server.url)
        for rep in range(args.repeats):
            client.flushdb()
            with stock.producer_or_acquire() as producer:
                for i in range(args.stock_events):
                    stock.send_task("stock.noop", args=({"n": i},), queue="stock",
                                    producer=producer)
            seconds = drain([sys.executable, "-m", "celery", "-A", "bench.stock_app", "worker",
                             "-Q", "stock", "-c", str(args.concurrency), "-l", "INFO",
                             "--without-gossip", "--without-mingle", "--prefetch-multiplier",
                             "4"], env, server.url, "stock", tmp / "stock.log")
            rates["stock_noop"].append(args.stock_events / seconds)
            client.flushdb()
            events = [{"id": str(uuid.uuid4()), "type": "demo.noop", "source": "bench",
                       "tier": "bulk", "payload": {"n": i}} for i in range(args.batch_events)]
            assert all(r.outcome == "accepted" for r in publisher.publish_many(events))
            seconds = drain([sys.executable, "-m", "pipeline", "worker", "--tier", "bulk",
                             "--without-gossip", "--without-mingle"], env, server.url, "bulk",
                            tmp / "pipeline.log")
            rates["batched_tier"].append(args.batch_events / seconds)
            print(f"repeat {rep + 1}: stock {rates['stock_noop'][-1]:,.0f}/s, batched tier "
                  f"{rates['batched_tier'][-1]:,.0f}/s")
        client.close()
    med = {k: median(v) for k, v in rates.items()}
    ratio = med["batched_tier"] / med["stock_noop"]
    print(f"\nmedian events/s per worker (-c {args.concurrency}): stock no-op "
          f"{med['stock_noop']:,.0f}, batched tier (batch_size {args.batch_size}) "
          f"{med['batched_tier']:,.0f}: {ratio:.1f}x (target >= {TARGET_RATIO:g}x)")
    path = write_results("batch", {"stock_events": args.stock_events,
                                   "batch_events": args.batch_events,
                                   "batch_size": args.batch_size,
                                   "concurrency": args.concurrency, "repeats": args.repeats,
                                   "events_per_s_median": med, "ratio": ratio,
                                   "target_ratio": TARGET_RATIO, "events_per_s": rates})
    print(f"results: {path}")
    return 0
