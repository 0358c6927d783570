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
  then skips kombu's own ``unacked`` write, one round trip fewer per message.
  While its queues are empty the consumer waits with ``BLMOVE q q RIGHT RIGHT``
  (a no-op rotation that blocks until the list is non-empty) on its first list,
  for at most ``FETCH_WAIT_S``, then fetches again: fresh work on the default
  priority wakes it at once, other sub-lists within ``FETCH_WAIT_S``.
* **Consumers lease their in-flight work**: each consuming channel has an id
  registered in the sorted set ``pipeline:consumers`` scored by a deadline that a
  heartbeat thread pushes ``lost_after_s`` ahead every ``lost_after_s / 5``. Every
  beat also runs the reaper: one Lua script that puts back, at the head of their
  queue, the messages still unacked in the in-flight hash of each consumer past its
  deadline (a SIGKILLed worker, a channel dropped by a connection reset), and
  forgets that consumer. Any live consumer reaps; the script is atomic, so a
  message is restored once.

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
from queue import Empty
from typing import Any

import redis
from kombu.transport import redis as kredis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

__all__ = ["CONSUMERS_KEY", "SentinelTransport", "Transport", "inflight_key", "install", "reap"]

log = logging.getLogger(__name__)

CONSUMERS_KEY = "pipeline:consumers"  # zset: consumer id -> deadline (epoch s)
FETCH_WAIT_S = 0.25  # longest wait on an empty queue before every sub-list is read again
LOST_AFTER_S = 15.0  # default: a consumer silent this long has its in-flight work restored
REAP_BATCH = 100  # dead consumers restored per reaper call

# KEYS: unacked, unacked_index, in-flight hash, consumers zset, then the lists in order.
# ARGV: now, deadline, consumer id. Returns {list, message} or nil.
_FETCH_LUA = """
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[3])
for i = 5, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local props = cjson.decode(item)['properties']
    local tag = props['delivery_tag']
    local info = props['delivery_info'] or {}
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '')
               .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[3], tag, KEYS[i] .. '\\n' .. item)
    return {KEYS[i], item}
  end
end
return false
"""

# KEYS: unacked, unacked_index, consumers zset. ARGV: now, in-flight key prefix, batch.
# Restores the in-flight messages of consumers past their deadline that are still
# unacked (an acked or already restored one is only forgotten). Returns how many.
_REAP_LUA = """
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local restored = 0
for _, consumer in ipairs(dead) do
  local key = ARGV[2] .. consumer
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    local tag, value = entries[i], entries[i + 1]
    if redis.call('HDEL', KEYS[1], tag) == 1 then
      local nl = string.find(value, '\\n', 1, true)
      redis.call('RPUSH', string.sub(value, 1, nl - 1), string.sub(value, nl + 1))
      restored = restored + 1
    end
    redis.call('ZREM', KEYS[2], tag)
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[3], consumer)
end
return restored
"""


def inflight_key(consumer: str) -> str:
    """``pipeline:inflight:<consumer>``: delivery tag -> ``"<list>\\n<message>"``."""
    return f"pipeline:inflight:{consumer}"


def reap(client: redis.Redis, *, unacked_key: str = "unacked",
         unacked_index_key: str = "unacked_index", now: float | None = None) -> int:
    """Restore the in-flight messages of every consumer past its deadline; how many."""
    return int(client.eval(_REAP_LUA, 3, unacked_key, unacked_index_key, CONSUMERS_KEY,
                           time.time() if now is None else now, inflight_key(""), REAP_BATCH))


class QoS(kredis.QoS):
    """kombu's Redis QoS; messages this transport fetched are already recorded."""

    def append(self, message: Any, delivery_tag: str) -> None:
        fetched: set[str] = self.channel._fetched
        if delivery_tag in fetched:
            fetched.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        super().append(message, delivery_tag)

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
        self._heartbeat: _Heartbeat | None = None

    # -- fetching -------------------------------------------------------------------
    def _lists(self, queues: list[str]) -> list[str]:
        return [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]

    def _fetch_keys(self, lists: list[str]) -> list[str]:
        return [self.unacked_key, self.unacked_index_key, inflight_key(self._consumer),
                CONSUMERS_KEY, *lists]

    def _ensure_consumer(self) -> None:
        if not self._consumer:
            self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            self._heartbeat = _Heartbeat(self, self._consumer)

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        self._ensure_consumer()
        lists = self._lists(queues)
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()
        if self._waiting:
            wait_s = min(FETCH_WAIT_S, timeout or self.brpop_timeout or FETCH_WAIT_S)
            self.client.connection.send_command("BLMOVE", lists[0], lists[0], "RIGHT", "RIGHT",
                                                wait_s)
            return
        keys = self._fetch_keys(lists)
        now = time.time()
        self.client.connection.send_command("EVAL", _FETCH_LUA, len(keys), *keys, now,
                                            now + self.lost_after_s, self._consumer)

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
            dest, item = (bytes_to_str(part) for part in reply)
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
        keys = self._fetch_keys(self._lists([queue]))
        now = time.time()
        with self.conn_or_acquire() as client:
            reply = client.eval(_FETCH_LUA, len(keys), *keys, now, now + self.lost_after_s,
                                self._consumer)
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
        super().close()  # restores what this channel still holds (warm shutdown)
        if heartbeat is not None:
            heartbeat.stop()
            heartbeat.forget(consumer)
        self._heartbeat = None
        self._consumer = ""


class _Heartbeat:
    """Pushes one consumer's deadline ahead and reaps dead consumers, in a thread."""

    def __init__(self, channel: Channel, consumer: str) -> None:
        self._client = redis.Redis(connection_pool=channel.pool)
        self._consumer = consumer
        self._lost_after_s = float(channel.lost_after_s)
        self._unacked = (channel.unacked_key, channel.unacked_index_key)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-fetch-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval_s = self._lost_after_s / 5
        while not self._stop.is_set():
            now = time.time()
            try:
                self._client.zadd(CONSUMERS_KEY, {self._consumer: now + self._lost_after_s})
                restored = reap(self._client, unacked_key=self._unacked[0],
                                unacked_index_key=self._unacked[1], now=now)
                if restored:
                    log.warning("restored %d in-flight messages of lost consumers", restored)
            except Exception as exc:  # never let the thread die: silence means "lost"
                log.warning("consumer heartbeat failed: %s", exc)
            self._stop.wait(interval_s)

    def stop(self) -> None:
        self._stop.set()

    def forget(self, consumer: str) -> None:
        """A clean close: whatever is left in flight is restored now, not at the deadline."""
        self._thread.join(timeout=self._lost_after_s / 5 + 1)
        try:
            self._client.zadd(CONSUMERS_KEY, {consumer: 0})
            reap(self._client, unacked_key=self._unacked[0], unacked_index_key=self._unacked[1])
        except (redis.RedisError, OSError) as exc:
            log.warning("consumer %s not forgotten (restored at its deadline): %s", consumer, exc)


class Transport(kredis.Transport):
    """kombu's Redis transport with :class:`Channel`'s reliable fetch."""

    Channel = Channel


#: the kombu transport aliases this module takes over (URL scheme -> class path)
ALIASES = {"redis": "pipeline.fetch:Transport", "rediss": "pipeline.fetch:Transport",
           "sentinel": "pipeline.fetch:SentinelTransport"}


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
