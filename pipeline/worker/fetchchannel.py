# celery-types stubs kombu's Redis channel without its internals, which this module extends
# mypy: disable-error-code="attr-defined,misc"
"""The reliable fetch's channel: kombu's Redis channel fetching through one Lua script
and leasing what it holds in flight.

Every fetch is :data:`~pipeline.worker.fetchscript.FETCH_LUA`: the acks waiting, then up
to the prefetch credit (at most :data:`FETCH_MOST`) messages popped and recorded as
unacked and in this consumer's in-flight hash in one atomic step. While its queues are
empty the consumer waits with ``BLMOVE q q RIGHT RIGHT`` on its first list for at most
:data:`FETCH_WAIT_S`, the next fetch pipelined behind the wait (one round trip). Each
consuming channel registers a consumer id leased by a heartbeat
(:mod:`pipeline.worker.inflight`); a channel whose connection drops gives up its id,
and what it held in flight is restored when the lease expires.
The design: :mod:`pipeline.worker.fetch`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from queue import Empty
from typing import Any

from kombu.transport import redis as kredis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from pipeline.worker.fanout import FanoutWriter
from pipeline.worker.fetchqos import QoS
from pipeline.worker.fetchscript import FETCH_LUA
from pipeline.worker.inflight import CONSUMERS_KEY, LOST_AFTER_S, Heartbeat, inflight_key

__all__ = ["FETCH_MOST", "FETCH_WAIT_S", "Channel", "SentinelChannel"]

# these lines keep the logger they had before they moved out of fetch.py (the JSON
# "logger" field: log queries and alerts may select on it)
log = logging.getLogger("pipeline.worker.fetch")

FETCH_WAIT_S = 0.25  # longest wait on an empty queue before every sub-list is read again
FETCH_MOST = 100  # most messages one fetch takes (within the prefetch credit left)


class Channel(kredis.Channel):
    QoS = QoS
    #: a consumer silent this long (its process died, its connection dropped) has its
    #: in-flight messages restored by any live consumer (transport option).
    lost_after_s = LOST_AFTER_S
    from_transport_options = (*kredis.Channel.from_transport_options, "lost_after_s")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fetched: set[str] = set()
        self._consumer = ""
        self._waiting = False  # the last fetch found nothing: the next one waits first
        self._heartbeat: Heartbeat | None = None
        self._acks: list[str] = []  # delivery tags acknowledged, sent with the next fetch
        self._acks_lock = threading.Lock()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        """kombu builds a new client object (its response-callback table copied) for
        every publish, ack and queue-length read: 9% of a worker's main process
        with task events on. One per channel serves them all (thread-safe: each
        command takes a connection from the pool)."""
        yield client or self._plain_client

    @cached_property
    def _plain_client(self) -> Any:
        return self._create_client()

    @cached_property
    def _fanout(self) -> FanoutWriter:
        return FanoutWriter(self._plain_client)

    def _put_fanout(self, exchange: str, message: Any, routing_key: str, **kwargs: Any) -> None:
        """Task events and broadcasts: written without waiting for Redis's reply
        (:mod:`pipeline.worker.fanout`); a producer's publish batch keeps kombu's way."""
        if kwargs.get("_publish_batch") is not None:
            super()._put_fanout(exchange, message, routing_key, **kwargs)
            return
        self._fanout.publish(self._get_publish_topics(exchange, routing_key), dumps(message))

    # -- fetching -------------------------------------------------------------------
    def _lists(self, queues: list[str]) -> list[str]:
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _fetch_command(self, lists: list[str], most: int) -> list[Any]:
        """``EVAL`` arguments of one fetch: the acks waiting, then up to ``most`` pops."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
        keys = [self.unacked_key, self.unacked_index_key, inflight_key(self._consumer),
                CONSUMERS_KEY, *lists]
        now = time.time()
        return [FETCH_LUA, len(keys), *keys, now, now + self.lost_after_s, self._consumer,
                most, len(acks), *acks]

    def _credit(self) -> int:
        """How many messages the prefetch limit lets this fetch take."""
        estimate = self.qos.can_consume_max_estimate()
        return max(1, min(FETCH_MOST, estimate if estimate else FETCH_MOST))

    def flush_acks(self) -> None:
        """Send the acknowledgements waiting for the next fetch now (shutdown)."""
        if not self._acks:
            return
        with self._acks_lock:
            acks, self._acks = self._acks, []
        consumer = inflight_key(self._consumer) if self._consumer else ""
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.hdel(self.unacked_key, *acks).zrem(self.unacked_index_key, *acks)
            if consumer:
                pipe.hdel(consumer, *acks)
            pipe.execute()

    def _ensure_consumer(self) -> None:
        if not self._consumer:
            self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            self._heartbeat = Heartbeat(
                self.pool, self._consumer, lost_after_s=float(self.lost_after_s),
                unacked_key=self.unacked_key, unacked_index_key=self.unacked_index_key)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._ensure_consumer()
        lists = self._lists(queues)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        fetch = ["EVAL", *self._fetch_command(lists, self._credit())]
        connection = self.client.connection
        if self._waiting:
            # the wait and the fetch behind it in one write: the server runs the fetch
            # the moment the wait returns, so waking up costs one round trip, not two
            wait_s = min(FETCH_WAIT_S, timeout or self.brpop_timeout or FETCH_WAIT_S)
            connection.send_packed_command(connection.pack_commands(
                [("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT", wait_s), fetch]))
            return
        connection.send_command(*fetch)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            try:
                if self._waiting:  # the wait's reply (the rotation it did is a no-op)
                    self.client.parse_response(self.client.connection, "BLMOVE", **options)
                reply = self.client.parse_response(self.client.connection, "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._drop_consumer()  # what it holds in flight is restored by the reaper
                self._waiting = False
                raise
            self._waiting = not reply
            if not reply:
                raise Empty()
            parts = [bytes_to_str(part) for part in reply]
            for dest, item in zip(parts[::2], parts[1::2], strict=True):
                message = loads(item)
                self._fetched.add(message["properties"]["delivery_tag"])
                queue = dest.rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(queue)
                self.connection._deliver(message, queue)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        self._ensure_consumer()
        with self.conn_or_acquire() as client:
            reply = client.eval(*self._fetch_command(self._lists([queue]), 1))
        if not reply:
            raise Empty()
        message = loads(bytes_to_str(reply[1]))
        self._fetched.add(message["properties"]["delivery_tag"])
        return message

    # -- lifetime ----------------------------------------------------------------------
    def _drop_consumer(self) -> None:
        """Stop leasing under the current id: its in-flight messages are restored once
        its deadline passes (the fetch reply may have been lost with the connection)."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._heartbeat = None
        self._consumer = ""

    def close(self) -> None:
        consumer, heartbeat = self._consumer, self._heartbeat
        try:
            self.flush_acks()
        except Exception as exc:  # restored at the deadline instead, then found settled
            log.warning("acknowledgements not sent at close: %s", exc)
        if "_fanout" in self.__dict__:
            self._fanout.close()  # before the pool's connections are closed
        super().close()  # restores what this channel still holds (warm shutdown)
        if heartbeat is not None:
            heartbeat.stop()
            heartbeat.forget(consumer)
        self._heartbeat = None
        self._consumer = ""


class SentinelChannel(Channel, kredis.SentinelChannel):
    from_transport_options = (*kredis.SentinelChannel.from_transport_options, "lost_after_s")
