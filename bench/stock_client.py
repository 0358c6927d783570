"""The Redis client the stock Celery apps' tasks write their marks with: one per
(pool) process, made on first use, on the app's own broker. The stock apps must
not import the pipeline, so they share this instead of ``pipeline.core.state``."""

from __future__ import annotations

import redis
from celery import Celery

__all__ = ["LazyRedis"]


class LazyRedis:
    """``client()``: this process's client for ``app``'s broker URL."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._client: redis.Redis | None = None

    def __call__(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(str(self._app.conf.broker_url))
        return self._client
