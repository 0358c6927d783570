"""The seed scenario's "default config" side: one Celery task on Celery's defaults.

What a team writes first: one app, the default queue (``celery``), default
worker settings (prefetch multiplier 4, early acks), and retries the shortest
way Celery offers, ``autoretry_for``, which keeps Celery's retry defaults:
``max_retries=3`` and ``default_retry_delay=180`` s (no backoff, no jitter).
An event whose retries run out is only logged: there is no dead-letter queue.
The bench counts it in :data:`~bench.seed.downstream.FAILED_KEY` to tell "failed
and logged" from "vanished"; both are lost. ``SEED_STOCK_RETRY=backoff``
switches to the Celery docs' ``retry_backoff=True`` recipe (1, 2, 4 s + jitter);
``SEED_STOCK_RETRY_DELAY_S`` replaces the 180 s (the quick run's time scale).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task

from bench.seed.downstream import FAILED_KEY, DownstreamError, call
from bench.stock_client import LazyRedis

app = Celery("seed-stock", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                worker_hijack_root_logger=False)

_redis = LazyRedis(app)  # per (pool) process, made on first use


class CountGiveUps(Task):  # type: ignore[type-arg]
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        _redis().hset(FAILED_KEY, str(args[0]["id"]), 1)


_retry: dict[str, Any] = ({"retry_backoff": True} if os.environ.get("SEED_STOCK_RETRY")
                          == "backoff" else {})
if os.environ.get("SEED_STOCK_RETRY_DELAY_S"):  # the quick run scales Celery's 180 s down
    _retry["default_retry_delay"] = float(os.environ["SEED_STOCK_RETRY_DELAY_S"])


@app.task(name="seed.handle", base=CountGiveUps, autoretry_for=(DownstreamError,), **_retry)
def handle(event: dict[str, Any]) -> None:
    call(_redis(), str(event["id"]), str(event["type"]))
