# celery-types stubs kombu's Redis channel without its internals, which this module extends
# mypy: disable-error-code="attr-defined,misc"
"""Reliable fetch for the Redis broker: a message is always in its queue or recorded
as in flight, and the in-flight work of a dead consumer is back on its queue in seconds.

kombu's Redis transport fetches with ``BRPOP`` and records the message as unacked
with a second command. ``BRPOP`` removes the message on the server; if the
connection drops before the reply is read (a reset, a SIGKILL between the two
commands), the message is in no list and not in ``unacked``: gone (kombu #305,
#593, #1785; celery #4354). And a consumer whose process died leaves its unacked
messages for the global visibility-timeout sweep, the longest tier's timeout.

This transport keeps kombu's Redis transport (queues, priority sub-lists, acks,
``unacked`` hash and index, Flower's queue lengths) and changes two things:

* **Fetch is one Lua script** that pops from the first non-empty sub-list (in
  kombu's order: priority, then the fair queue rotation) and, in the same atomic
  step, writes the message into ``unacked``/``unacked_index`` and into this
  consumer's in-flight hash ``pipeline:inflight:<consumer>`` (tag -> source list
  and message). Nothing can fall between the pop and the record; the consumer
  then skips kombu's own ``unacked`` write, one round trip fewer per message. One
  fetch takes as many messages as the prefetch credit allows (up to ``FETCH_MOST``)
  and carries the acknowledgements made since the last one: an ack costs no round
  trip of its own (the try's settle, already written, makes a redelivery of a
  message whose ack was lost with the process harmless; a clean close sends them).
  While its queues are empty the consumer waits with ``BLMOVE q q RIGHT RIGHT``
  (a no-op rotation that blocks until the list is non-empty) on its first list,
  for at most ``FETCH_WAIT_S``, then fetches again: fresh work on the default
  priority wakes it at once, other sub-lists within ``FETCH_WAIT_S``.
* **Consumers lease their in-flight work** (:mod:`pipeline.worker.inflight`): each
  consuming channel has an id registered in the sorted set ``pipeline:consumers``
  scored by a deadline that a heartbeat thread pushes ``lost_after_s`` ahead every
  ``lost_after_s / 5``. Every beat also runs the reaper: one Lua script that puts
  back, at the head of their queue, the messages still unacked in the in-flight hash
  of each consumer past its deadline (a SIGKILLed worker, a channel dropped by a
  connection reset), and forgets that consumer. Any live consumer reaps; the script
  is atomic, so a message is restored once.

Design choice (docs/design.md, "Reliable fetch"): dramatiq's Redis broker fetches
with one Lua call into a per-worker ack set and requeues the sets of workers whose
heartbeats stopped; Sidekiq Pro's super_fetch ``LMOVE``s into a private per-process
list recovered at start-up. Lua is needed here because a Celery worker reads many
sub-lists (ten priorities per queue) and ``LMOVE`` takes one source; heartbeats with
a deadline give recovery in seconds without waiting for a restart of the same host.
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
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from pipeline.worker.inflight import CONSUMERS_KEY, LOST_AFTER_S, Heartbeat, inflight_key
from pipeline.worker.poller import Poller

__all__ = ["SentinelTransport", "Transport", "install"]

log = logging.getLogger(__name__)

FETCH_WAIT_S = 0.25  # longest wait on an empty queue before every sub-list is read again
FETCH_MOST = 100  # most messages one fetch takes (within the prefetch credit left)

# KEYS: unacked, unacked_index, in-flight hash, consumers zset, then the lists in order.
# ARGV: now, deadline, consumer id, most messages, acks n, then n delivery tags to ack.
# Acks first (removed from unacked, its index and the in-flight hash), then pops up to
# "most" messages, recording each. Returns {list, message, list, message, ...}.
_FETCH_LUA = """
local n_acks = tonumber(ARGV[5])
for i = 6, 5 + n_acks do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('HDEL', KEYS[3], ARGV[i])
end
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
local most, out = tonumber(ARGV[4]), {}
for i = 5, #KEYS do
  while #out < 2 * most do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local props = cjson.decode(item)['properties']
    local tag = props['delivery_tag']
    local info = props['delivery_info'] or {}
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '')
               .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[3], tag, KEYS[i] .. '\\n' .. item)
    out[#out + 1] = KEYS[i]
    out[#out + 1] = item
  end
  if #out >= 2 * most then break end
end
return out
"""

class QoS(kredis.QoS):
    """kombu's Redis QoS; messages this transport fetched are already recorded."""

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched: set[str] = self.channel._fetched
        if delivery_tag in fetched:
            fetched.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """Acknowledged in the channel's next fetch (same round trip), not by a command
        of its own: the try's settle already made a redelivery harmless."""
        if self.channel.closed:  # a task that outlived its connection: see reject()
            virtual.QoS.ack(self, delivery_tag)
            return
        if self.channel._consumer:
            with self.channel._acks_lock:
                self.channel._acks.append(delivery_tag)
            virtual.QoS.ack(self, delivery_tag)
        else:
            super().ack(delivery_tag)
        if isinstance(cycle := self.channel.connection.cycle, Poller):
            cycle.credit.set()  # a consumer blocked for credit may fetch again

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """On a channel closed under a running task (the broker connection was lost;
        tasks run on), kombu would rebuild a pool from connection info that is gone
        and raise ``AttributeError``, which takes the worker down. The message is
        already back on its queue (restored at close) or in the dead consumer's
        in-flight hash, restored when its lease expires: only forget it here."""
        if self.channel.closed:
            virtual.QoS.ack(self, delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> None:
        """kombu's restore at close, which must never take the worker down: after a
        broker crash the channel's pool and its connection info may be gone
        (``AttributeError`` deep in kombu, which Celery's ``ignore_errors`` does not
        catch: "Unrecoverable error"). What is not restored here stays in this
        consumer's in-flight hash and the reaper puts it back after ``lost_after_s``."""
        try:
            super().restore_unacked(client)
        except Exception as exc:
            log.warning("in-flight messages not restored at close (%r); they come back "
                        "when this consumer's lease expires", exc)
            if self._delivered is not None:
                self._delivered.clear()

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        pipe = super()._remove_from_indices(delivery_tag, pipe)
        consumer = self.channel._consumer
        return pipe.hdel(inflight_key(consumer), delivery_tag) if consumer else pipe


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
        self._waiting = False  # the command in flight is the BLMOVE wait, not a fetch
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
        return [_FETCH_LUA, len(keys), *keys, now, now + self.lost_after_s, self._consumer,
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
        if self._waiting and not self._acks:
            wait_s = min(FETCH_WAIT_S, timeout or self.brpop_timeout or FETCH_WAIT_S)
            self.client.connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT",
                                                wait_s)
            return
        self._waiting = False
        self.client.connection.send_command("EVAL", *self._fetch_command(lists, self._credit()))

    def _brpop_read(self, **options: Any) -> bool:
        waited = self._waiting
        try:
            try:
                reply = self.client.parse_response(
                    self.client.connection, "BLMOVE" if waited else "EVAL", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                self._drop_consumer()  # what it holds in flight is restored by the reaper
                raise
            if waited:
                self._waiting = False
                raise Empty()
            if not reply:
                self._waiting = True
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
        super().close()  # restores what this channel still holds (warm shutdown)
        if heartbeat is not None:
            heartbeat.stop()
            heartbeat.forget(consumer)
        self._heartbeat = None
        self._consumer = ""


class Transport(kredis.Transport):
    """kombu's Redis transport with :class:`Channel`'s reliable fetch."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # waits for credit, not a second (workers with no event loop)


#: the kombu transport aliases this module takes over (URL scheme -> class path)
ALIASES = {"redis": "pipeline.worker.fetch:Transport", "rediss": "pipeline.worker.fetch:Transport",
           "sentinel": "pipeline.worker.fetch:SentinelTransport"}


def install() -> None:
    """Make kombu resolve ``redis://``, ``rediss://`` and ``sentinel://`` to this module's
    transports in this process. Done through kombu's alias table rather than Celery's
    ``broker_transport`` so that URLs keep their scheme: ``Connection.as_uri()``, which
    Flower reads to pick its broker client for queue lengths, still says ``redis://``."""
    from kombu import transport as ktransport

    for scheme, path in ALIASES.items():
        if ktransport.TRANSPORT_ALIASES.get(scheme) != path:
            ktransport.TRANSPORT_ALIASES[scheme] = path
            ktransport._transport_cache.pop(scheme, None)


class SentinelChannel(Channel, kredis.SentinelChannel):
    from_transport_options = (*kredis.SentinelChannel.from_transport_options, "lost_after_s")


class SentinelTransport(kredis.SentinelTransport):
    """kombu's Sentinel transport with :class:`Channel`'s reliable fetch."""

    Channel = SentinelChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()
