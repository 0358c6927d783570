"""Consumers lease their in-flight work: heartbeats, deadlines and the reaper.

Each consuming channel of :mod:`pipeline.worker.fetchchannel` has an id registered in the sorted
set ``pipeline:consumers``, scored by a deadline that its :class:`Heartbeat` thread
pushes ``lost_after_s`` ahead every fifth of that. Its fetched messages are recorded
in its in-flight hash ``pipeline:inflight:<id>`` (tag -> source list and message) by
the fetch script itself. Every beat also runs :func:`reap`: one Lua script that puts
back, at the head of their list, the messages still unacked in the in-flight hash of
each consumer past its deadline (a SIGKILLed worker, a channel dropped by a
connection reset), and forgets that consumer. Any live consumer reaps; the script is
atomic, so a message is restored once.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

__all__ = ["CONSUMERS_KEY", "LOST_AFTER_S", "Heartbeat", "inflight_key", "reap"]

log = logging.getLogger(__name__)

CONSUMERS_KEY = "pipeline:consumers"  # zset: consumer id -> deadline (epoch s)
LOST_AFTER_S = 15.0  # default: a consumer silent this long has its in-flight work restored
REAP_BATCH = 100  # dead consumers restored per reaper call

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


class Heartbeat:
    """Pushes one consumer's deadline ahead and reaps dead consumers, in a thread."""

    def __init__(self, pool: redis.ConnectionPool, consumer: str, *, lost_after_s: float,
                 unacked_key: str, unacked_index_key: str) -> None:
        self._client = redis.Redis(connection_pool=pool)
        self._consumer = consumer
        self._lost_after_s = lost_after_s
        self._unacked = (unacked_key, unacked_index_key)
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
