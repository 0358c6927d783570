"""Large DLQs stay usable: ``dlq list`` and ``dlq stats`` over 100,000 records.

Fills an own broker's DLQ with N records of five causes (real kombu messages,
one written through ``DeadLetterQueue.put`` and varied), then times, in the same
run: the floor (reading the raw entries with paged LRANGE), decoding every
record, grouping by fingerprint, and the CLI commands end to end (which read the
DLQ's index, rebuilt once after the fill).

    python -m bench dlq [--records 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

from bench.common import median, own_broker, write_results
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.retry import Reason
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.triage import group_by_fingerprint
from pipeline.worker.runtime import runtime_for

CAUSES = [  # (handler, exception, message template): five real causes
    ("rewards.credit", "httpx.ReadTimeout", "timed out after {n}ms calling rewards-api"),
    ("rewards.credit", "builtins.KeyError", "'user_{n}'"),
    ("game.update", "sqlalchemy.exc.IntegrityError", "duplicate key value id={n}"),
    ("analytics.ingest", "pipeline.errors.PermanentError", "schema v{n} unsupported"),
    ("callbacks.stripe", "requests.HTTPError", "502 Bad Gateway for order 0x{n:x}"),
]


def fill(url: str, records: int) -> None:
    settings = load_settings(broker_url=url, dlq_max_records=0, dlq_max_age_s=0)
    rt = runtime_for(create_app(settings, main="bench-dlq"))
    now = datetime.now(UTC)
    template = DeadLetterRecord(
        id="template", event={"id": "x", "type": "bench.event", "source": "bench", "payload": {}},
        tier="standard", handler="h", reason=Reason.RETRIES_EXHAUSTED, attempts=6,
        exception="E", message="m", traceback="Traceback (most recent call last): ...\n" * 5,
        first_failed_at=now, last_failed_at=now, worker="bench", task_id="t", queue="standard")
    rt.dlq.put(template)
    client = redis.Redis.from_url(url)
    raw = client.rpop(settings.dead_letter_queue)
    envelope = orjson.loads(raw)  # type: ignore[arg-type]
    pipe = client.pipeline(transaction=False)
    for i in range(records):
        handler, exc, msg = CAUSES[i % len(CAUSES)]
        body = template.model_copy(update={
            "id": str(uuid.uuid4()), "handler": handler, "exception": exc,
            "message": msg.format(n=i), "event": {**template.event, "id": str(uuid.uuid4())},
            "tier": ("critical", "standard", "bulk")[i % 3]}).model_dump_json().encode()
        envelope["body"] = base64.b64encode(body).decode()
        pipe.lpush(settings.dead_letter_queue, orjson.dumps(envelope))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    client.close()


def read_raw(url: str, queue: str) -> int:
    client = redis.Redis.from_url(url)
    n, end = 0, -1
    while batch := client.lrange(queue, end - 999, end):
        n += len(batch)
        end -= 1000
    client.close()
    return n


def cli_seconds(url: str, *args: str) -> float:
    env = {**os.environ, "PIPELINE_BROKER_URL": url}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "dlq", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench dlq")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    t: dict[str, list[float]] = {k: [] for k in (
        "raw_lrange", "decode_all", "group_by_fingerprint", "cli_stats", "cli_list_filtered")}
    with own_broker() as server:
        fill(server.url, args.records)
        settings = load_settings(broker_url=server.url)
        rt = runtime_for(create_app(settings, main="bench-dlq-read"))
        assert rt.dlq.index is not None
        rt.dlq.index.rebuild()  # as `pipeline dlq reindex` after filling like an old version
        groups: list[Any] = []
        for rep in range(args.repeats):
            started = time.perf_counter()
            assert read_raw(server.url, settings.dead_letter_queue) == args.records
            t["raw_lrange"].append(time.perf_counter() - started)
            started = time.perf_counter()
            records = rt.dlq.records()
            t["decode_all"].append(time.perf_counter() - started)
            started = time.perf_counter()
            groups = group_by_fingerprint(records)
            t["group_by_fingerprint"].append(time.perf_counter() - started)
            t["cli_stats"].append(cli_seconds(server.url, "stats", "--json"))
            t["cli_list_filtered"].append(cli_seconds(server.url, "list", "--handler",
                                                      "game.update", "--json"))
            print(f"repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in t.items()))
        assert len(groups) == len(CAUSES), [g.as_dict() for g in groups]
    med = {k: median(v) for k, v in t.items()}
    floor = med["raw_lrange"]
    print(f"\nmedians over {args.repeats} repeats, {args.records:,} records "
          f"({len(groups)} fingerprints found):")
    for k, v in med.items():
        print(f"  {k:<22} {v:6.2f}s  ({v / floor:4.1f}x the raw LRANGE floor)")
    path = write_results("dlq", {"records": args.records, "repeats": args.repeats,
                                 "seconds_median": med, "ratio_to_raw_lrange": {
                                     k: v / floor for k, v in med.items()},
                                 "fingerprints": len(groups), "seconds": t})
    print(f"results: {path}")
    return 0
