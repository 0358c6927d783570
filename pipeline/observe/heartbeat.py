"""Worker heartbeats: which tiers have a worker online, and how much each holds.

Every worker's main process writes, every ``HEARTBEAT_INTERVAL_S``, one field per
tier it serves into the hash ``pipeline:workers:<tier>``: its node name mapped to
``"<epoch s> <in flight>"``, where *in flight* counts the messages it holds
unacknowledged (running plus prefetched). A reader counts the fields seen within
``HEARTBEAT_STALE_S``. The exporter (``pipeline_workers_online``) and ``pipeline
status`` read these in their one round trip, instead of broadcasting Celery's
``inspect ping`` (slow, and unanswered by a busy solo worker) on every scrape.
A warm shutdown removes the worker's fields; a killed worker's go stale.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import bootsteps

from pipeline.core.state import Keys
from pipeline.worker.runtime import runtime_for

__all__ = ["HEARTBEAT_STALE_S", "HeartbeatStep", "parse_beat", "workers_key"]

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 5.0  # how often a worker reports itself
HEARTBEAT_STALE_S = 15.0  # a worker not heard from for this long counts as offline
HEARTBEAT_FORGET_S = 3600.0  # fields older than this are deleted by the next beat

# KEYS: the tiers' hashes. ARGV: node, "<now> <in flight>", forget-before (epoch s).
_BEAT_LUA = """
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, ARGV[1], ARGV[2])
  local entries = redis.call('HGETALL', key)
  for i = 1, #entries, 2 do
    local seen = tonumber(string.match(entries[i + 1], '^(%S+)'))
    if seen == nil or seen < tonumber(ARGV[3]) then redis.call('HDEL', key, entries[i]) end
  end
end
return #KEYS
"""


def workers_key(tier: str) -> str:
    """``pipeline:workers:<tier>``: node name -> ``"<last seen epoch s> <in flight>"``."""
    return f"{Keys.prefix}workers:{tier}"


def parse_beat(value: bytes | str) -> tuple[float, int]:
    """``(last seen, in flight)`` of one heartbeat field; ``(0, 0)`` if unreadable."""
    text = value.decode() if isinstance(value, bytes) else value
    parts = text.split()
    try:
        return float(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except (IndexError, ValueError):
        return 0.0, 0


def _held_messages() -> int:
    from celery.worker import state

    return len(state.reserved_requests)


class HeartbeatStep(bootsteps.StartStopStep):
    """Runs a daemon thread in the worker's main process that writes heartbeats."""

    label = "pipeline-heartbeat"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        settings = runtime_for(worker.app).settings
        consumed = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self.tiers = [t for q in consumed if (t := settings.tier_for_queue(q)) is not None]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node = ""
        self._client: redis.Redis | None = None

    def start(self, worker: Any) -> None:
        if not self.tiers:
            return
        self._node = str(worker.hostname)
        self._client = runtime_for(worker.app).state
        beat = self._client.register_script(_BEAT_LUA)
        keys = [workers_key(t) for t in self.tiers]

        def run() -> None:
            while True:
                now = time.time()
                try:
                    beat(keys=keys, args=[self._node, f"{now:.3f} {_held_messages()}",
                                          now - HEARTBEAT_FORGET_S])
                except (redis.RedisError, OSError) as exc:
                    log.warning("heartbeat not written: %s", exc)
                if self._stop.wait(HEARTBEAT_INTERVAL_S):
                    return

        self._thread = threading.Thread(target=run, name="pipeline-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, worker: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(HEARTBEAT_INTERVAL_S)
        self._thread = None
        if self._client is not None:
            try:
                pipe = self._client.pipeline(transaction=False)
                for tier in self.tiers:
                    pipe.hdel(workers_key(tier), self._node)
                pipe.execute()
            except (redis.RedisError, OSError) as exc:
                log.warning("heartbeat not removed (it goes stale instead): %s", exc)

    shutdown = stop
