"""Enqueueing planned events on the broker, with their idempotency claims.

On a Redis broker each chunk costs one round trip: a Lua script that, per event,
claims its idempotency key (``SET NX EX``; within the event's source unless
``idempotency_scope = "global"``, :meth:`Enqueuer.seen_key`) and, only if fresh,
``LPUSH``es its pre-rendered task messages — atomically, so an event is never marked seen without
being enqueued. Events of batched tiers are packed into ``pipeline.handle_batch``
messages (one Lua call per message, see :mod:`pipeline.worker.batch`).

On RabbitMQ claim and publish cannot be one atomic step, so a claim has two
stages. One Lua call claims the chunk's keys as *pending* (``SET NX EX``
:data:`PENDING_CLAIM_TTL_S`, value ``pending:<token of this call>``); each event
is published with publisher confirms and, once all its messages are confirmed,
its key becomes the full-window ``seen`` claim (``1``, ``EX
idempotency_window_s``). On any failure the pending claims of what was not
confirmed are released (deleted only if they still hold this call's token), and
a crash that cannot release them leaves them to expire after
:data:`PENDING_CLAIM_TTL_S`. So a key is never ``seen`` unless its event's
messages were confirmed, and a failed publish can be re-sent at once.

An event whose key another call holds *pending* is answered ``rejected`` with
reason :data:`IN_FLIGHT` (HTTP 409 with ``Retry-After``), not ``duplicate``:
that other publish may still fail, and ``duplicate`` would tell the client to
stop sending an event that may never have been enqueued. Retried later, it is
``duplicate`` if the other publish was confirmed, else ``accepted`` (after a
release at once, after a crash once the pending claim expired). A crash between
the confirm and the promotion to ``seen`` leaves that one event pending: a
retry after the expiry enqueues it again under the same deterministic task id,
and the worker's done mark keeps its handlers from running twice.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis
from kombu.exceptions import OperationalError

from pipeline.core.events import Event
from pipeline.core.handlers import registry
from pipeline.core.names import TASK_NAME
from pipeline.core.redisurl import mask_urls, redact
from pipeline.core.state import Keys
from pipeline.errors import BrokerUnavailable
from pipeline.messages.batch import batch_spec
from pipeline.messages.task import RedisMessageRenderer, TaskSpec
from pipeline.producer.wiring import ProducerWiring

__all__ = ["IN_FLIGHT", "PENDING_CLAIM_TTL_S", "Claim", "Enqueuer", "Planned", "unavailable"]

PENDING_CLAIM_TTL_S = 60  # RabbitMQ: an unconfirmed claim is free again after this long
IN_FLIGHT = "in_flight"  # rejection reason: another publish of this key is unconfirmed
_PENDING_PREFIX = "pending:"  # value prefix of a pending claim (then the call's token)

# KEYS: seen keys. ARGV: this call's pending value, pending ttl_s.
# Per key: 1 claimed (pending), 0 seen (a duplicate), 2 pending by another call,
# 3 pending by this call (the same key twice in one chunk).
_CLAIM_PENDING_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then
    out[i] = 1
  else
    local held = redis.call('GET', key)
    if held == ARGV[1] then out[i] = 3
    elseif held == '1' then out[i] = 0
    else out[i] = 2 end
  end
end
return out
"""

# KEYS: seen keys. ARGV: this call's pending value. Delete only claims still ours.
_RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); n = n + 1 end
end
return n
"""

# ARGV: ttl_s, n_events, then per event: dedupe key, n messages, (list key, payload) * n.
# ARGV: ttl_s, n, dedupe keys * n, list key, message. Returns {} when pushed, else the
# 1-based indexes of the duplicates (claims of this call released, nothing pushed).
PACK_LUA = """
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local claimed, dups = {}, {}
for i = 1, n do
  if ttl == 0 or redis.call('SET', ARGV[2 + i], '1', 'NX', 'EX', ttl) then
    claimed[#claimed + 1] = ARGV[2 + i]
  else
    dups[#dups + 1] = i
  end
end
if #dups > 0 then
  if #claimed > 0 then redis.call('DEL', unpack(claimed)) end
  return dups
end
redis.call('LPUSH', ARGV[3 + n], ARGV[4 + n])
return {}
"""


_ENQUEUE_LUA = """
local ttl = tonumber(ARGV[1])
local i = 3
local out, lists = {}, {}
for e = 1, tonumber(ARGV[2]) do
  local key, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local fresh = 1
  if ttl > 0 and not redis.call('SET', key, '1', 'NX', 'EX', ttl) then fresh = 0 end
  if fresh == 1 then
    for m = 0, n - 1 do
      local list = ARGV[i + 2 * m]
      local pending = lists[list]
      if pending == nil then pending = {}; lists[list] = pending end
      pending[#pending + 1] = ARGV[i + 2 * m + 1]
      if #pending == 1000 then redis.call('LPUSH', list, unpack(pending)); lists[list] = {} end
    end
  end
  i = i + 2 * n
  out[e] = fresh
end
for list, pending in pairs(lists) do
  if #pending > 0 then redis.call('LPUSH', list, unpack(pending)) end
end
return out
"""


class Claim(StrEnum):
    """What claiming an event's idempotency key found."""

    FRESH = "fresh"  # claimed, and its messages are on the broker
    DUPLICATE = "duplicate"  # accepted before, within the window
    IN_FLIGHT = IN_FLIGHT  # RabbitMQ: another publish of it is not confirmed yet


@dataclass
class Planned:
    """One event on its way: its tier, handlers and task messages."""

    event: Event
    event_id: str
    tier: str
    handlers: list[str]
    specs: list[TaskSpec]


class Enqueuer:
    """Claims idempotency keys and puts task messages on the broker."""

    def __init__(self, runtime: ProducerWiring, renderer: RedisMessageRenderer | None) -> None:
        self.rt = runtime
        self._renderer = renderer
        on_redis = renderer is not None
        self._enqueue_script = runtime.state.register_script(_ENQUEUE_LUA) if on_redis else None
        self._pack_script = runtime.state.register_script(PACK_LUA)
        self._claim_pending = runtime.state.register_script(_CLAIM_PENDING_LUA)
        self._release = runtime.state.register_script(_RELEASE_LUA)
        self.pending_ttl_s = PENDING_CLAIM_TTL_S

    def claim_and_send(self, plans: list[Planned]) -> list[Claim]:
        """Per plan: fresh (claimed and enqueued), a duplicate, or in flight elsewhere."""
        if not plans:
            return []
        ttl = self.rt.settings.idempotency_window_s
        try:
            if self._enqueue_script is None:
                return self._send_amqp(plans, ttl)
            packed = [p for p in plans if self._packable(p)]
            if not packed:
                return _claims(self._send_redis(plans, ttl))
            single = [p for p in plans if not self._packable(p)]
            fresh = dict(zip(map(id, single), self._send_redis(single, ttl), strict=True))
            fresh.update(self._send_packed(packed, ttl))
            return _claims(fresh[id(p)] for p in plans)
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise unavailable(self.rt.settings.effective_broker_url, exc) from exc

    def seen_key(self, plan: Planned) -> str:
        """The idempotency claim of ``plan``'s event: its key (else id), within its
        source unless ``idempotency_scope`` is ``global``."""
        event = plan.event
        scoped = self.rt.settings.idempotency_scope == "source"
        return Keys.seen(event.idempotency_key or plan.event_id,
                         event.source if scoped else None)

    def _packable(self, plan: Planned) -> bool:
        """Events of a batched tier with exactly one handler that may run in a batch."""
        if self.rt.settings.tier(plan.tier).batch_size <= 0 or len(plan.handlers) != 1:
            return False
        entry = registry.get(plan.handlers[0])
        return entry is not None and entry.batchable

    def _send_packed(self, plans: list[Planned], ttl: int) -> dict[int, bool]:
        """Pack events into ``pipeline.handle_batch`` messages, one Lua call per message."""

        renderer = self._renderer
        assert renderer is not None  # packing is for Redis brokers
        fresh: dict[int, bool] = {}
        groups: dict[tuple[str, str], list[Planned]] = {}
        for plan in plans:
            groups.setdefault((plan.tier, plan.handlers[0]), []).append(plan)
        for (tier, handler), members in groups.items():
            size = self.rt.settings.tier(tier).batch_size
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                while chunk:
                    spec = batch_spec(self.rt.settings, [p.specs[0].args[0] for p in chunk],
                                      handler=handler, tier=tier,
                                      accepted_at=chunk[0].specs[0].kwargs["accepted_at"])
                    key, payload = renderer.render(spec)
                    keys = [self.seen_key(p) for p in chunk]
                    dups = self._pack_script(keys=[], args=[ttl, len(chunk), *keys, key, payload])
                    if not dups:
                        fresh.update((id(p), True) for p in chunk)
                        break
                    dup_ids = {id(chunk[int(i) - 1]) for i in dups}
                    fresh.update((i, False) for i in dup_ids)
                    chunk = [p for p in chunk if id(p) not in dup_ids]
        return fresh

    def _send_redis(self, plans: list[Planned], ttl: int) -> list[bool]:
        assert self._enqueue_script is not None
        assert self._renderer is not None
        renderer = self._renderer
        argv: list[Any] = [ttl, len(plans)]
        for plan in plans:
            argv += [self.seen_key(plan).encode(), len(plan.specs)]
            for spec in plan.specs:
                argv.extend(renderer.render(spec))
        return [bool(x) for x in self._enqueue_script(keys=[], args=argv)]

    def _send_amqp(self, plans: list[Planned], ttl: int) -> list[Claim]:
        """Pending claims, confirmed publishes, then ``seen`` claims (module docstring)."""
        if ttl <= 0:  # idempotency off: nothing to claim
            for plan in plans:
                self.send(plan.specs)
            return [Claim.FRESH] * len(plans)
        state = self.rt.state
        token = f"{_PENDING_PREFIX}{uuid.uuid4().hex}"
        keys = [self.seen_key(p) for p in plans]
        found = self._claim_pending(keys=keys, args=[token, self.pending_ttl_s])
        claims = [_PENDING_FOUND[int(x)] for x in found]
        ours = [k for k, x in zip(keys, found, strict=True) if int(x) == 1]
        unconfirmed = set(ours)
        try:
            for plan, key, x in zip(plans, keys, found, strict=True):
                if int(x) != 1:
                    continue
                self.send(plan.specs)  # confirmed, else raises
                state.set(key, "1", ex=ttl)  # only now is the event "seen"
                unconfirmed.discard(key)
        except BaseException:
            if unconfirmed:  # best effort: a claim left behind expires after the pending TTL
                with contextlib.suppress(redis.RedisError, OSError):
                    self._release(keys=sorted(unconfirmed), args=[token])
            raise
        return claims

    def send(self, specs: Iterable[TaskSpec]) -> None:
        """Publish with Celery's own path (confirmed on RabbitMQ)."""
        task = self.rt.app.tasks[TASK_NAME]
        policy = {"max_retries": self.rt.settings.publish_max_retries, "interval_start": 0,
                  "interval_step": 0.5, "interval_max": 1.0}
        try:
            for spec in specs:
                task.apply_async(args=tuple(spec.args), kwargs=spec.kwargs, retry=True,
                                 retry_policy=policy,
                                 **spec.apply_async_options(self.rt.settings.redact_paths))
        except (OperationalError, ConnectionError, OSError) as exc:
            raise unavailable(self.rt.settings.effective_broker_url, exc) from exc


_PENDING_FOUND = {1: Claim.FRESH, 0: Claim.DUPLICATE, 2: Claim.IN_FLIGHT,
                  3: Claim.DUPLICATE}  # what _CLAIM_PENDING_LUA's answers mean


def _claims(fresh: Iterable[bool]) -> list[Claim]:
    return [Claim.FRESH if f else Claim.DUPLICATE for f in fresh]


def unavailable(broker_url: str, exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"broker {redact(broker_url)} unreachable: {mask_urls(str(exc))}")

