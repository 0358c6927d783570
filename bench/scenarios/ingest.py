"""Ingest throughput: ``publish_many`` and HTTP batch against a plain ``apply_async`` loop.

All three sides publish the same N small events to the same own broker in one
run, repeated; medians and the ratios against the ``apply_async`` baseline are
printed and written to ``bench/results/ingest.json``.

    python -m bench ingest [--events 10000] [--repeats 5] [--http-batch 1000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import subprocess
import sys
import time
import uuid
from typing import Any

import orjson
import redis
from celery import Celery

from bench.common import median, own_broker, write_results
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.local.embedded import free_port
from pipeline.worker.runtime import runtime_for

SERVER_READY_TIMEOUT_S = 30.0  # how long `pipeline serve` may take to answer /healthz


def events(n: int) -> list[dict[str, Any]]:
    return [{"id": str(uuid.uuid4()), "type": "demo.ok", "source": "bench",
             "payload": {"n": i, "user_id": i % 1000}} for i in range(n)]


def apply_async_loop(url: str, batch: list[dict[str, Any]]) -> float:
    """The baseline: a bare Celery app, one apply_async per event."""
    app = Celery("baseline", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"])

    @app.task(name="baseline.handle")
    def handle(event: dict[str, Any]) -> None:  # never runs: nothing consumes the queue
        return None

    handle.apply_async((batch[0],), queue="baseline")  # connect outside the timing
    started = time.perf_counter()
    for event in batch:
        handle.apply_async((event,), queue="baseline")
    return time.perf_counter() - started


def publish_many(url: str, batch: list[dict[str, Any]]) -> float:
    settings = load_settings(broker_url=url, handler_modules=["pipeline.demo"])
    publisher = runtime_for(create_app(settings, main="bench-ingest")).publisher
    publisher.publish_many(events(1))  # connect and load scripts outside the timing
    started = time.perf_counter()
    results = publisher.publish_many(batch)
    elapsed = time.perf_counter() - started
    assert all(r.outcome == "accepted" for r in results), "bench events must all be accepted"
    return elapsed


def http_batches(port: int, token: str, batch: list[dict[str, Any]], size: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = [orjson.dumps(batch[i:i + size]) for i in range(0, len(batch), size)]
    started = time.perf_counter()
    for body in bodies:
        conn.request("POST", "/events/batch", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        assert response.status == 202, (response.status, payload[:300])
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


def start_api(url: str, token: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PIPELINE_BROKER_URL": url, "PIPELINE_API_TOKEN": token,
           "PIPELINE_HANDLER_MODULES": '["pipeline.demo"]'}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("pipeline serve did not start")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench ingest")
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--http-batch", type=int, default=1000)
    args = parser.parse_args(argv)
    token = secrets.token_urlsafe(16)
    timings: dict[str, list[float]] = {"apply_async_loop": [], "publish_many": [],
                                       "http_batch": []}
    with own_broker() as server:
        api, port = start_api(server.url, token)
        client = redis.Redis.from_url(server.url)
        try:
            for rep in range(args.repeats):
                for side in timings:  # interleaved, so drift hits all sides alike
                    batch = events(args.events)
                    if side == "apply_async_loop":
                        t = apply_async_loop(server.url, batch)
                    elif side == "publish_many":
                        t = publish_many(server.url, batch)
                    else:
                        t = http_batches(port, token, batch, args.http_batch)
                    timings[side].append(t)
                    client.flushdb()
                print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
                    f"{k} {args.events / v[-1]:,.0f}/s" for k, v in timings.items()))
        finally:
            api.terminate()
            api.wait(10)
            client.close()
    rates = {k: args.events / median(v) for k, v in timings.items()}
    base = rates["apply_async_loop"]
    ratios = {"publish_many_vs_apply_async": rates["publish_many"] / base,
              "http_batch_vs_apply_async": rates["http_batch"] / base}
    print(f"\nmedian events/s over {args.repeats} repeats of {args.events} events:")
    for side, rate in rates.items():
        print(f"  {side:<18} {rate:>10,.0f}/s  ({rate / base:.1f}x apply_async)")
    path = write_results("ingest", {
        "events": args.events, "repeats": args.repeats, "http_batch_size": args.http_batch,
        "events_per_s_median": rates, "ratios": ratios,
        "targets": {"publish_many_vs_apply_async": 10.0, "http_batch_vs_apply_async": 5.0},
        "seconds": timings,
    })
    print(f"results: {path}")
    return 0
