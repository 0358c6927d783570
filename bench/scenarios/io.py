"""I/O-bound tiers: a threads tier and a gevent tier against a prefork tier.

Every event's handler (:mod:`bench.io_handlers`) makes one HTTP call to a local
server that answers after ``--delay-ms`` (:mod:`bench.io_server`). Each side is one
``pipeline worker --tier io`` draining the same number of pre-queued events, in the
same run: prefork ``-c 4``, threads ``-c 64``, gevent ``-c 64``. Reports events/s
(events over first handler start -> last handler end), handler run time p50/p99 (the
50 ms wait included), and the RSS of all the worker's processes (peak, sampled while
it drains). Target: threads and gevent >= 10x prefork.

Task events are off on every side (under threads and gevent each is a broker round
trip of the process that runs the handlers). ``--batch-size N`` gives the tier
``batch_size = N`` on every side (results in ``io-batchN.json``).

    python -m bench io [--quick] [--events 10000] [--delay-ms 50] [--repeats 1]
                       [--batch-size 0] [--pools prefork,threads,gevent]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    child_pids,
    clean_env,
    median,
    own_broker,
    percentile,
    results_dir,
    rss_kb,
    start_worker,
    stop_worker,
    versions,
    write_results,
)
from bench.io_handlers import TIMES_KEY
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.local.embedded import free_port
from pipeline.worker.runtime import runtime_for

SIDES = {"prefork": 4, "threads": 64, "gevent": 64}  # pool -> concurrency
TARGET_RATIO = 10.0  # threads and gevent events/s over prefork's
RSS_SAMPLE_S = 0.5  # how often the worker's RSS is read while it drains
DRAIN_TIMEOUT_S = 900.0  # a side that has not handled every event by then fails the run
SERVER_READY_TIMEOUT_S = 10.0  # the downstream server must listen by then

CONFIG = """
handler_modules = ["bench.io_handlers"]
default_tier = "io"

[tiers.io]
pool = "{pool}"
concurrency = {concurrency}
prefetch_multiplier = 4
accept_unenforced_time_limit = true  # the handler's call times out after 5 s
retry_budget_ratio = 0
batch_size = {batch_size}
task_events = false  # each task state is a broker round trip of the process running the
                     # handlers under threads/gevent; the same on every side
"""


def start_server(port: int, delay_ms: float) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.io_server", "--port", str(port),
                             "--delay-ms", str(delay_ms)])
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the downstream server did not listen")


def drain_side(pool: str, concurrency: int, events: int, url: str, env: dict[str, str],
               tmp: Path, batch_size: int = 0) -> dict[str, Any]:
    """Queue ``events``, start one worker of the pool, wait until every handler ran."""
    config = tmp / f"{pool}.toml"
    config.write_text(CONFIG.format(pool=pool, concurrency=concurrency, batch_size=batch_size))
    env = {**env, "PIPELINE_CONFIG": str(config)}
    client = redis.Redis.from_url(url)
    client.flushdb()
    settings = load_settings(config, broker_url=url)
    publisher = runtime_for(create_app(settings, main=f"bench-io-{pool}")).publisher
    batch = [{"id": str(uuid.uuid4()), "type": "bench.io", "source": "bench", "payload": {}}
             for _ in range(events)]
    assert all(r.outcome == "accepted" for r in publisher.publish_many(batch))
    proc = start_worker([sys.executable, "-m", "pipeline", "worker", "--tier", "io",
                         "--without-gossip", "--without-mingle"], env, tmp / f"{pool}.log")
    peak_kb, processes, cpu_s = 0, 0, 0.0
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while client.llen(TIMES_KEY) < events:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{pool}: {client.llen(TIMES_KEY)} of {events} handled")
            sizes = rss_kb(proc.pid)
            if sum(sizes.values()) > peak_kb:
                peak_kb, processes = sum(sizes.values()), len(sizes)
            time.sleep(RSS_SAMPLE_S)
        cpu_s = cpu_seconds(proc.pid)
    finally:
        stop_worker(proc)
    times = [tuple(map(float, raw.split())) for raw in client.lrange(TIMES_KEY, 0, -1)]
    client.close()
    span_s = max(end for _, end in times) - min(start for start, _ in times)
    run_ms = [(end - start) * 1000 for start, end in times]
    return {"pool": pool, "concurrency": concurrency, "events_per_s": events / span_s,
            "handler_ms": {"p50": percentile(run_ms, 0.5), "p99": percentile(run_ms, 0.99)},
            "rss_mib_peak": peak_kb / 1024, "processes": processes,
            "cpu_ms_per_event": cpu_s * 1000 / events}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live children so far, from /proc."""
    ticks = 0
    for p in [pid, *child_pids(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench io")
    parser.add_argument("--quick", action="store_true",
                        help="500 events a side; results go to bench/results/quick/")
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="the io tier's batch_size on every side (0: one event a message)")
    parser.add_argument("--pools", default=",".join(SIDES),
                        help="comma-separated sides to run (prefork is the baseline)")
    args = parser.parse_args(argv)
    pools = {p: SIDES[p] for p in args.pools.split(",")}
    args.events = args.events or (500 if args.quick else 10_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-io-"))
    port = free_port()
    server = start_server(port, args.delay_ms)
    runs: dict[str, list[dict[str, Any]]] = {pool: [] for pool in pools}
    try:
        with own_broker() as broker:
            env = {**clean_env(), "PIPELINE_BROKER_URL": broker.url,
                   "BENCH_IO_URL": f"http://127.0.0.1:{port}/"}
            for rep in range(args.repeats):
                for pool, concurrency in pools.items():
                    run = drain_side(pool, concurrency, args.events, broker.url, env, tmp,
                                     args.batch_size)
                    runs[pool].append(run)
                    print(f"repeat {rep + 1} {pool} -c {concurrency}: "
                          f"{run['events_per_s']:,.0f} events/s, handler p99 "
                          f"{run['handler_ms']['p99']:.1f} ms, RSS peak "
                          f"{run['rss_mib_peak']:.0f} MiB ({run['processes']} processes), "
                          f"CPU {run['cpu_ms_per_event']:.2f} ms/event")
            machine = versions(broker.url)
    finally:
        server.terminate()
        server.wait()
    return report(args, runs, machine)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]],
           machine: dict[str, Any]) -> int:
    sides = {pool: {"pool": pool, "concurrency": SIDES[pool],
                    "events_per_s": median([r["events_per_s"] for r in rs]),
                    "handler_ms": {q: median([r["handler_ms"][q] for r in rs])
                                   for q in ("p50", "p99")},
                    "rss_mib_peak": median([r["rss_mib_peak"] for r in rs]),
                    "cpu_ms_per_event": median([r["cpu_ms_per_event"] for r in rs]),
                    "processes": rs[-1]["processes"]} for pool, rs in runs.items()}
    if "prefork" not in sides:  # no baseline: figures only
        for pool, s in sides.items():
            print(f"{pool}: {s['events_per_s']:,.0f} events/s, p99 "
                  f"{s['handler_ms']['p99']:.1f} ms, CPU {s['cpu_ms_per_event']:.2f} ms/event")
        return 0
    base = sides["prefork"]["events_per_s"]
    ratios = {pool: s["events_per_s"] / base for pool, s in sides.items() if pool != "prefork"}
    checks = [{"name": f"{pool} -c {SIDES[pool]} / prefork -c {SIDES['prefork']} events/s",
               "value": ratio, "op": ">=", "target": TARGET_RATIO,
               "met": ratio >= TARGET_RATIO} for pool, ratio in ratios.items()]
    for pool, s in sides.items():
        print(f"{pool:8} -c {s['concurrency']:<3} {s['events_per_s']:8,.0f} events/s "
              f"({s['events_per_s'] / base:5.1f}x)  handler p50 {s['handler_ms']['p50']:6.1f} "
              f"ms p99 {s['handler_ms']['p99']:6.1f} ms  RSS {s['rss_mib_peak']:6.0f} MiB "
              f"in {s['processes']} processes, CPU {s['cpu_ms_per_event']:.2f} ms/event")
    scenario = "io" if not args.batch_size else f"io-batch{args.batch_size}"
    path = write_results(scenario, {
        "quick": args.quick, "events": args.events, "batch_size": args.batch_size,
        "task_events": False, "delay_ms": args.delay_ms, "repeats": args.repeats,
        "sides": sides, "ratios": ratios, "checks": checks, "runs": runs},
        quick=args.quick, machine=machine)
    print(f"results: {path}")
    from bench.charts import render

    print(f"chart: {render(scenario, results_dir(args.quick))}")
    return 0 if all(c["met"] for c in checks) else 1
