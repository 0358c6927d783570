"""The Redis that holds the pipeline's own state, and the key names in it.

With a Redis broker this is the broker itself (so retries move onto tier queues
atomically); with RabbitMQ it is the Redis named by ``state_url``. It holds the
scheduled-retry sets, per-attempt delivery counts and the demo's effect log.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.sentinel import Sentinel

__all__ = ["DeliveryCounter", "Keys", "connect"]

DELIVERY_COUNT_TTL_S = 7 * 24 * 3600  # a delivery count outlives any redelivery delay
SOCKET_TIMEOUT_S = 10.0  # a state-store call that takes longer than this fails
CONNECT_TIMEOUT_S = 3.0  # how long to wait for the state store to accept a connection


class Keys:
    """Key names, all under one ``pipeline:`` prefix so operators can find them."""

    prefix = "pipeline:"

    @classmethod
    def retries(cls, queue: str) -> str:
        return f"{cls.prefix}retry:{queue}"

    @classmethod
    def deliveries(cls, task_id: str, attempt: int) -> str:
        return f"{cls.prefix}deliveries:{task_id}:{attempt}"

    @classmethod
    def seen(cls, dedupe_key: str) -> str:
        """An event id / idempotency key accepted at ingest (TTL: the idempotency window)."""
        return f"{cls.prefix}seen:{dedupe_key}"

    @classmethod
    def done(cls, task_id: str) -> str:
        """A (event, handler) task whose handler succeeded (TTL: the idempotency window)."""
        return f"{cls.prefix}done:{task_id}"

    @classmethod
    def demo_effects(cls) -> str:
        return f"{cls.prefix}demo:effects"


def connect(url: str, transport_options: dict[str, Any] | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``sentinel://`` hosts
    joined by ``;``; Sentinel needs ``master_name`` in ``transport_options``)."""
    options = transport_options or {}
    if url.startswith("sentinel://"):
        hosts = []
        password = None
        db = 0
        for part in url.split(";"):
            parsed = urlsplit(part)
            hosts.append((parsed.hostname or "localhost", parsed.port or 26379))
            password = parsed.password or password
            if parsed.path.strip("/").isdigit():
                db = int(parsed.path.strip("/"))
        master = options.get("master_name")
        if not master:
            raise ValueError("sentinel:// needs broker_transport_options.master_name")
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            socket_timeout=SOCKET_TIMEOUT_S,
            sentinel_kwargs=options.get("sentinel_kwargs"),
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            master, password=unquote(password) if password else None, db=db,
            socket_timeout=SOCKET_TIMEOUT_S,
        )
        return client
    return redis.Redis.from_url(
        _redis_py_url(url), socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )


def _redis_py_url(url: str) -> str:
    """``url`` with ``ssl_cert_reqs=CERT_REQUIRED`` (the spelling Celery documents and
    kombu accepts) as ``required``, the only spelling redis-py accepts."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    fixed = [(k, v.lower().removeprefix("cert_") if k == "ssl_cert_reqs" else v)
             for k, v in query]
    return url if fixed == query else urlunsplit(parts._replace(query=urlencode(fixed)))


class DeliveryCounter:
    """Per-task bookkeeping around a handler run, one round trip each side.

    Redis keeps no delivery count and a crashing handler kills its worker before
    it can record anything, so deliveries are counted *before* the handler runs
    and cleared once the attempt settles. A handler that succeeded leaves a
    ``done`` mark for ``window_s`` so a redelivery of its task does not run it again.
    """

    def __init__(self, client: redis.Redis, window_s: int) -> None:
        self._client = client
        self._window_s = window_s

    def begin(self, task_id: str, attempt: int) -> tuple[bool, int]:
        """``(already done, deliveries of this attempt including this one)``."""
        key = Keys.deliveries(task_id, attempt)
        pipe = self._client.pipeline()
        pipe.exists(Keys.done(task_id))
        pipe.incr(key)
        pipe.expire(key, DELIVERY_COUNT_TTL_S)
        done, count, _ = pipe.execute()
        return bool(done) and self._window_s > 0, int(count)

    def succeeded(self, task_id: str, attempt: int) -> None:
        pipe = self._client.pipeline()
        if self._window_s > 0:
            pipe.set(Keys.done(task_id), "1", ex=self._window_s)
        pipe.delete(Keys.deliveries(task_id, attempt))
        pipe.execute()

    def clear(self, task_id: str, attempt: int) -> None:
        self._client.delete(Keys.deliveries(task_id, attempt))
