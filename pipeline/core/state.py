"""The Redis that holds the pipeline's own state, and the key names in it.

With a Redis broker this is the broker itself (so retries move onto tier queues
atomically); with RabbitMQ it is the Redis named by ``state_url``. It holds the
scheduled-retry sets, per-try run and settle marks, the demo's effect log, breakers
and retry budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from pipeline.errors import NO_VALUE, ConfigError, FieldProblem

__all__ = ["Keys", "connect", "resend"]

T = TypeVar("T")

SOCKET_TIMEOUT_S = 10.0  # a state-store call that takes longer than this fails
CONNECT_TIMEOUT_S = 3.0  # how long to wait for the state store to accept a connection


class Keys:
    """Key names, all under one ``pipeline:`` prefix so operators can find them."""

    prefix = "pipeline:"

    @classmethod
    def retries(cls, queue: str) -> str:
        return f"{cls.prefix}retry:{queue}"

    @classmethod
    def running(cls, task_id: str, try_key: str) -> str:
        """One try of a task began and has not settled: ``"<token> <host> <epoch s>"``."""
        return f"{cls.prefix}running:{task_id}:{try_key}"

    @classmethod
    def settled(cls, task_id: str, try_key: str) -> str:
        """One try of a task settled (its outcome written); a redelivery only acks."""
        return f"{cls.prefix}settled:{task_id}:{try_key}"

    @classmethod
    def seen(cls, dedupe_key: str, source: str | None = None) -> str:
        """An event id / idempotency key accepted at ingest (TTL: the idempotency window),
        within its ``source`` when given. A source never holds ``|`` (events.py), and
        ``seen-src:`` is no ``seen:`` key: the two key spaces cannot meet."""
        if source is None:
            return f"{cls.prefix}seen:{dedupe_key}"
        return f"{cls.prefix}seen-src:{source}|{dedupe_key}"

    @classmethod
    def done(cls, task_id: str) -> str:
        """A (event, handler) task whose handler succeeded (TTL: the idempotency window)."""
        return f"{cls.prefix}done:{task_id}"

    @classmethod
    def breaker_holds(cls, name: str) -> str:
        """Tasks deferred while a breaker was open: task id -> accepted at (sorted set);
        ``<key>:entries`` maps each to its ``"<retry key>\\n<member>"`` (hash)."""
        return f"{cls.prefix}breaker:{name}:holds"

    @classmethod
    def breaker(cls, name: str) -> str:
        """A downstream's circuit breaker (hash; window buckets under ``<key>:w:``)."""
        return f"{cls.prefix}breaker:{name}"

    @classmethod
    def breaker_probes(cls, name: str) -> str:
        """A breaker's half-open probe leases (sorted set: token scored by its expiry)."""
        return f"{cls.breaker(name)}:probes"

    @classmethod
    def retry_budget(cls, tier: str) -> str:
        """Prefix of a tier's retry-budget buckets; ``<prefix>exhausted`` counts refusals."""
        return f"{cls.prefix}budget:{tier}:"

    @classmethod
    def dlq_evictions(cls) -> str:
        """Records evicted from the DLQ by retention (a counter)."""
        return f"{cls.prefix}dlq:evictions"

    @classmethod
    def dlq_index(cls, queue: str) -> str:
        """Prefix of the DLQ's index keys (:mod:`pipeline.dlq.index`)."""
        return f"{cls.prefix}dlqix:{queue}:"

    @classmethod
    def dlq_audit(cls) -> str:
        """Audit entries of DLQ replays and purges (a list, newest first)."""
        return f"{cls.prefix}dlq:audit"

    @classmethod
    def ingest_counts(cls) -> str:
        """Publish outcomes by ``tier|type|outcome|reason`` (a hash of counters)."""
        return f"{cls.prefix}ingest:counts"

    @classmethod
    def demo_effects(cls) -> str:
        return f"{cls.prefix}demo:effects"


def connect(url: str, transport_options: dict[str, Any] | None = None, *,
            timeout_s: float | None = None) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``sentinel://`` hosts
    joined by ``;``; Sentinel needs ``master_name`` in ``transport_options``).

    ``timeout_s`` makes a probe client: that connect and socket timeout, and no
    retries (redis-py otherwise retries a refused connection for seconds).
    """
    options = transport_options or {}
    socket_timeout_s = SOCKET_TIMEOUT_S if timeout_s is None else timeout_s
    connect_timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    probe: dict[str, Any] = {} if timeout_s is None else {"retry": Retry(NoBackoff(), 0)}
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
            raise ConfigError([FieldProblem("broker_transport_options.master_name", NO_VALUE,
                                           "sentinel:// needs it")])
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            socket_timeout=socket_timeout_s,
            sentinel_kwargs=options.get("sentinel_kwargs"),
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
            master, password=unquote(password) if password else None, db=db,
            socket_timeout=socket_timeout_s, **probe,
        )
        return guard_replies(client)
    return guard_replies(redis.Redis.from_url(
        _redis_py_url(url), socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s, **probe,
    ))


class _ReplyGuard:
    """Mixed into a client's connection class: notes whether the last command sent on
    the connection has had its reply read (see :func:`guard_replies`)."""

    awaiting_reply = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        super().send_packed_command(command, check_health)  # type: ignore[misc]
        self.awaiting_reply = True

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError:  # an error reply: read all the same
            self.awaiting_reply = False
            raise
        self.awaiting_reply = False
        return response

    def disconnect(self, *args: Any) -> None:
        self.awaiting_reply = False
        super().disconnect(*args)  # type: ignore[misc]


def guard_replies(client: redis.Redis) -> redis.Redis:
    """``client``, whose pool closes a connection handed back with a reply unread.

    An exception raised *into* a thread between a command's send and its reply (a
    prefork soft time limit in a handler, gevent's hard limit) leaves the reply on
    the socket, and redis-py returns the connection to its pool as it is: the next
    command on it, the pipeline's own begin or settle included, would read that stale
    reply as its own. redis-py already drops a connection interrupted while it sends
    or reads; this closes the gap between the two. (A connection held for pipelined
    sends, as the settle stream's, may send again before reading: only its return
    to the pool is checked.)"""
    pool = client.connection_pool
    base = pool.connection_class
    if issubclass(base, _ReplyGuard):
        return client
    pool.connection_class = type(f"Guarded{base.__name__}", (_ReplyGuard, base), {})
    release = pool.release

    def release_read(connection: Any) -> None:
        if getattr(connection, "awaiting_reply", False):
            connection.disconnect()
        release(connection)

    pool.release = release_read  # type: ignore[method-assign]
    return client


def _redis_py_url(url: str) -> str:
    """``url`` with ``ssl_cert_reqs=CERT_REQUIRED`` (the spelling Celery documents and
    kombu accepts) as ``required``, the only spelling redis-py accepts."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    fixed = [(k, v.lower().removeprefix("cert_") if k == "ssl_cert_reqs" else v)
             for k, v in query]
    return url if fixed == query else urlunsplit(parts._replace(query=urlencode(fixed)))


def resend(call: Callable[[], T], pauses_s: Sequence[float],
           on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """``call()``, made again after a connection error or timeout, with ``pauses_s``
    between the tries (``on_retry`` told of each); the last error is raised. Only for
    an idempotent call: one whose first send may have run with its reply lost."""
    for pause_s in (*pauses_s, None):
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            if pause_s is None:
                raise
            if on_retry is not None:
                on_retry(exc, pause_s)
            time.sleep(pause_s)
    raise AssertionError("unreachable")
