"""The Redis that holds the pipeline's own state, and the key names in it.

With a Redis broker this is the broker itself (so retries move onto tier queues
atomically); with RabbitMQ it is the Redis named by ``state_url``. It holds the
scheduled-retry sets, per-attempt delivery counts and the demo's effect log.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

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
        url, socket_timeout=SOCKET_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S
    )


class DeliveryCounter:
    """Counts deliveries of one attempt of one task. Redis keeps no delivery count
    and a crashing handler kills its worker before it can record anything, so the
    count is taken *before* the handler runs and cleared once the attempt settles."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def incr(self, task_id: str, attempt: int) -> int:
        key = Keys.deliveries(task_id, attempt)
        pipe = self._client.pipeline()
        pipe.incr(key)
        pipe.expire(key, DELIVERY_COUNT_TTL_S)
        count, _ = pipe.execute()
        return int(count)

    def clear(self, task_id: str, attempt: int) -> None:
        self._client.delete(Keys.deliveries(task_id, attempt))
