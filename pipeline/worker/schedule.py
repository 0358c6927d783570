"""The scheduled-retry store: retries wait in Redis, not in worker memory.

Why not Celery's ``countdown``/ETA retries: on Redis the worker fetches an ETA
message at once and holds it unacknowledged in memory until it is due. A wait
longer than the visibility timeout gets it redelivered (duplicates, kombu #337);
thousands of them pile up in one worker while fresh work waits; a SIGKILL sends
them all back through the visibility-timeout sweep. So, as Sidekiq's retry set:

* a failed attempt is written to the sorted set ``pipeline:retry:<queue>``
  scored by its due time, *then* its message is acknowledged;
* every worker runs a mover (:class:`RetryMover`) that moves due entries onto
  the tier queue. With a Redis broker the entry already holds the exact message
  kombu would have pushed, and one Lua script pushes it and removes it from the
  set atomically: never lost, never moved twice.
* With RabbitMQ (state in a separate Redis) the mover leases entries, publishes
  them with publisher confirms, then removes them: a mover crash between confirm
  and removal re-sends one entry (at-least-once, like everything on AMQP).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import redis

from pipeline.core.names import TASK_NAME
from pipeline.core.state import Keys, resend
from pipeline.messages.task import RedisMessageRenderer, TaskSpec

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["RetryMover", "RetrySchedule"]

log = logging.getLogger(__name__)

LEASE_S = 30.0  # AMQP mover: a leased entry becomes due again after this long
MOVER_ERROR_BACKOFF_MAX_S = 5.0  # longest pause of a mover whose store is unreachable

# Move due members onto their list. Member = "<list key>\n<raw kombu message>".
_MOVE_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local nl = string.find(member, '\\n', 1, true)
  redis.call('LPUSH', string.sub(member, 1, nl - 1), string.sub(member, nl + 1))
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Lease due members: push their score LEASE seconds ahead and return them.
_LEASE_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), member)
end
return due
"""


# Bring the work a breaker held back forward, newest first: each held task (KEYS[1],
# task id -> accepted at) whose entry (KEYS[2], task id -> "<retry key>\n<member>") is
# still scheduled later than now becomes due, the newest accepted with the smallest
# score, so the mover queues it first. An entry the mover moved already (or that a
# retry of its task replaced) is only forgotten. ARGV: now, limit, rank of the first.
_RELEASE_LUA = """
local now, rank = tonumber(ARGV[1]), tonumber(ARGV[3])
local held = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local released = 0
for _, task in ipairs(held) do
  local entry = redis.call('HGET', KEYS[2], task)
  if entry then
    local nl = string.find(entry, '\\n', 1, true)
    local key, member = string.sub(entry, 1, nl - 1), string.sub(entry, nl + 1)
    local due = redis.call('ZSCORE', key, member)
    if due and tonumber(due) > now then
      redis.call('ZADD', key, 'XX', now - 2 + math.min(rank + released, 100000) * 1e-5, member)
      released = released + 1
    end
  end
  redis.call('ZREM', KEYS[1], task)
  redis.call('HDEL', KEYS[2], task)
end
return {#held, released}
"""

# Hold a deferred task's entry for its breaker's release (KEYS: holds, entries, the
# breaker's hash; ARGV: task id, accepted at, "<retry key>\n<member>", ttl_s, now),
# unless the breaker is closed by now: then it closed after the deferral and its
# release may have run already, so the entry is made due at once. Returns 1 if held.
_HOLD_LUA = """
local forced = redis.call('HGET', KEYS[3], 'forced')
local st = redis.call('HGET', KEYS[3], 'state') or 'closed'
if forced == 'closed' or (not forced and st == 'closed') then
  local nl = string.find(ARGV[3], '\\n', 1, true)
  local key, member = string.sub(ARGV[3], 1, nl - 1), string.sub(ARGV[3], nl + 1)
  local due = redis.call('ZSCORE', key, member)
  if due and tonumber(due) > tonumber(ARGV[5]) then
    redis.call('ZADD', key, 'XX', tonumber(ARGV[5]), member)
  end
  return 0
end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
return 1
"""
RELEASE_CHUNK = 500  # holds released per script call (each call is atomic)
RELEASE_RETRY_DELAYS_S = (0.05, 0.25, 1.0)  # pauses before a chunk cut by a reset is re-sent
HOLDS_TTL_S = 7 * 24 * 3600  # a breaker's holds outlive any outage it is still open for


class RetrySchedule:
    """Durable schedule of retries, one sorted set per tier queue."""

    def __init__(self, app: Celery, client: redis.Redis, *, atomic_move: bool,
                 redact_paths: Sequence[str] = ()) -> None:
        self._app = app
        self._redact_paths = tuple(redact_paths)
        self._client = client
        self._atomic = atomic_move
        self._renderer = (RedisMessageRenderer(app, redact_paths=redact_paths)
                          if atomic_move else None)
        self._move = client.register_script(_MOVE_DUE_LUA)
        self._lease = client.register_script(_LEASE_DUE_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._hold = client.register_script(_HOLD_LUA)

    def entry(self, spec: TaskSpec) -> tuple[str, bytes]:
        """``(sorted set, member)`` that schedules ``spec``: written by the settle step
        (:mod:`pipeline.worker.ledger`) atomically with the try's settled mark."""
        if self._renderer is not None:
            list_key, payload = self._renderer.render(spec)
            member = list_key + b"\n" + payload
        else:
            member = json.dumps(asdict(spec)).encode()
        return Keys.retries(spec.queue), member

    def add(self, spec: TaskSpec, due_at: float) -> None:
        """Schedule ``spec`` to be enqueued at ``due_at`` (epoch seconds)."""
        key, member = self.entry(spec)
        self._client.zadd(key, {member: due_at})

    def hold(self, downstream: str, task_id: str, entry: tuple[str, bytes],
             accepted_at: float, *, now: float | None = None) -> bool:
        """Note that ``task_id``'s schedule ``entry`` waits for ``downstream``'s breaker,
        so :meth:`release` can bring it forward when the breaker closes; if it has
        closed since the work was deferred (its release may be over), the entry is made
        due now instead. Only a hint: a hold lost (a crash before it is written) leaves
        the entry due when it was. One per task (its latest deferral), so the holds stay
        as large as the backlog. Returns whether it was held."""
        holds = Keys.breaker_holds(downstream)
        key, member = entry
        return bool(self._hold(
            keys=[holds, holds + ":entries", Keys.breaker(downstream)],
            args=[task_id, accepted_at, key.encode() + b"\n" + member, HOLDS_TTL_S,
                  time.time() if now is None else now]))

    def release(self, downstream: str, *, now: float | None = None) -> int:
        """Make the work held for ``downstream``'s breaker due now (it has just closed
        after a successful probe), the latest accepted first: after an outage that is
        the work still within its SLO, the rest has missed it either way. Returns how
        many entries moved forward. The workers' concurrency, not a spread, paces the
        calls that follow; deferred work keeps queueing behind fresh events."""
        now = time.time() if now is None else now
        holds = Keys.breaker_holds(downstream)
        released = 0
        while True:
            seen, moved = self._release_chunk([holds, holds + ":entries"],
                                              [now, RELEASE_CHUNK, released])
            released += int(moved)
            if int(seen) < RELEASE_CHUNK:
                return released

    def _release_chunk(self, keys: list[str], args: list[Any]) -> list[Any]:
        """One chunk of :meth:`release`, sent again after a connection error: a chunk
        that ran moves nothing twice (its holds are gone, its entries due already)."""
        return resend(lambda: list(self._release(keys=keys, args=args)),
                      RELEASE_RETRY_DELAYS_S)

    def pending(self, queue: str) -> int:
        return int(self._client.zcard(Keys.retries(queue)))

    def move_due(self, queue: str, *, now: float | None = None, limit: int = 1000) -> int:
        """Enqueue up to ``limit`` due retries of ``queue``; returns how many moved."""
        now = time.time() if now is None else now
        key = Keys.retries(queue)
        if self._atomic:
            return int(self._move(keys=[key], args=[now, limit]))
        moved = 0
        for raw in self._lease(keys=[key], args=[now, limit, LEASE_S]):
            spec = TaskSpec(**json.loads(raw))
            self._app.send_task(TASK_NAME, args=spec.args, kwargs=spec.kwargs,
                                **spec.apply_async_options(self._redact_paths))
            self._client.zrem(key, raw)
            moved += 1
        return moved


class RetryMover:
    """A daemon thread that moves due retries of ``queues`` onto their queues."""

    def __init__(self, schedule: RetrySchedule, queues: list[str], *, interval_s: float,
                 batch: int) -> None:
        self._schedule = schedule
        self._queues = queues
        self._interval_s = interval_s
        self._batch = batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeline-retry-mover", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def tick(self) -> int:
        moved = 0
        for queue in self._queues:
            while True:
                n = self._schedule.move_due(queue, limit=self._batch)
                moved += n
                if n < self._batch or self._stop.is_set():
                    break
        return moved

    def _run(self) -> None:
        pause_s = self._interval_s
        failures = 0  # in a row: the first is logged with its traceback, the rest in one line
        while not self._stop.wait(pause_s):
            try:
                moved = self.tick()
                if moved:
                    log.info("moved %d due retries onto %s", moved, ",".join(self._queues))
                if failures:
                    log.warning("retry mover works again after %d failures", failures)
                failures = 0
                pause_s = self._interval_s
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.exception("retry mover failed; retrying")
                else:
                    log.warning("retry mover failed %d times in a row (%s); retrying in %.2gs",
                                failures, exc, min(MOVER_ERROR_BACKOFF_MAX_S, pause_s * 2))
                pause_s = min(MOVER_ERROR_BACKOFF_MAX_S, pause_s * 2)
