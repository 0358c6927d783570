"""A bare Celery app: the stock side of the batch, overhead and isolation benchmarks.

``stock.noop`` does nothing; ``stock.critical``, ``stock.mark`` and ``stock.bulk`` are
the plain Celery twins of :mod:`bench.handlers` (same Redis keys, same work).
"""

from __future__ import annotations

import os
import time

from celery import Celery

from bench.keys import BULK_DONE_KEY, STARTED_KEY, STARTS_KEY
from bench.stock_client import LazyRedis

app = Celery("stock", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], task_acks_late=True,
                task_ignore_result=True, worker_hijack_root_logger=False)

_redis = LazyRedis(app)  # per (pool) process, made on first use


@app.task(name="stock.noop")
def noop(event: dict[str, object]) -> None:
    return None


@app.task(name="stock.critical")
def critical(event: dict[str, object]) -> None:
    _redis().hset(STARTED_KEY, str(event["id"]), repr(time.time()))


@app.task(name="stock.mark")
def mark(event: dict[str, object]) -> None:
    pipe = _redis().pipeline(transaction=False)
    pipe.hsetnx(STARTED_KEY, str(event["id"]), repr(time.time()))
    pipe.hincrby(STARTS_KEY, str(event["id"]), 1)
    pipe.execute()


@app.task(name="stock.bulk")
def bulk(event: dict[str, object]) -> None:
    payload = event.get("payload")
    ms = payload.get("ms", 5) if isinstance(payload, dict) else 5
    time.sleep(float(ms) / 1000)
    _redis().incr(BULK_DONE_KEY)
