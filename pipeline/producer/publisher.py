"""Publishing: validate -> classify -> admit -> dedupe -> fan out per handler -> enqueue.

:meth:`Publisher.publish_many` is the fast path. Each chunk of
``publish_batch_size`` events is validated, classified, admitted and planned
here, then claimed and enqueued in one round trip by :mod:`pipeline.producer.enqueue`.

Nothing is reported ``accepted`` that is not on the broker: if the broker cannot
be reached, :class:`~pipeline.errors.BrokerUnavailable` is raised for the chunk.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from kombu.exceptions import OperationalError

from pipeline.core.admission import TIER_FULL, DepthCache, admitted
from pipeline.core.events import Event, parse_event
from pipeline.core.handlers import Handler, registry
from pipeline.core.tiers import classify
from pipeline.errors import BrokerUnavailable, EventValidationError, SetupError
from pipeline.messages.task import RedisMessageRenderer, TaskSpec, redis_list_key
from pipeline.producer import counts as ingestcounts
from pipeline.producer.coalesce import Coalescer
from pipeline.producer.enqueue import IN_FLIGHT, Claim, Enqueuer, Planned, unavailable
from pipeline.producer.queuedepth import passive_depth
from pipeline.producer.wiring import ProducerWiring

__all__ = ["FORBIDDEN_SOURCE", "PublishResult", "Publisher", "event_task_id", "publish_listeners",
           "task_id_for"]

_TASK_NAMESPACE = uuid.UUID("6a1f0b7e-3c4d-4f5a-8b9c-0d1e2f3a4b5c")  # uuid5 namespace for task ids
_NAMESPACE_BYTES = _TASK_NAMESPACE.bytes
_CACHE_MAX_ENTRIES = 100_000  # classification results kept per publisher
FAN_OUT_HANDLER = ""  # handler name of a task that asks the worker to fan out
FORBIDDEN_SOURCE = "forbidden_source"  # rejection reason: the caller may not publish for it
Item = Event | Mapping[str, Any] | str | bytes

@dataclass(frozen=True)
class PublishResult:
    """What happened to one event: ``accepted``, ``duplicate`` or ``rejected``."""

    id: str | None
    tier: str | None
    outcome: str = "accepted"
    type: str | None = None
    reason: str | None = None  # rejected: "invalid", "forbidden_source", "tier_full",
    #                            or "in_flight"
    errors: list[dict[str, Any]] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    handlers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "tier": self.tier, "outcome": self.outcome}
        if self.reason:
            data["reason"] = self.reason
        if self.errors:
            data["errors"] = self.errors
        return data


def task_id_for(event_id: uuid.UUID | str, handler: str, source: str | None = None) -> str:
    """Deterministic task id for (event, handler), within ``source``: a re-publish
    reuses it, and the same event id from two sources is two tasks (two done marks).

    ``uuid.uuid5(_TASK_NAMESPACE, f"{source}|{event_id}/{handler}")`` (without
    ``source``, as under ``idempotency_scope = "global"``: ``f"{event_id}/{handler}"``),
    formatted without building UUID objects (it runs once per published task).
    """
    name = f"{event_id}/{handler}" if source is None else f"{source}|{event_id}/{handler}"
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def event_task_id(event: Mapping[str, Any], handler: str, scope: str) -> str:
    """The task id of ``event`` (a message's event dict) for ``handler``: namespaced by
    its source unless ``scope`` (``idempotency_scope``) is ``global``. Every place that
    derives one (publish, a batch's events on the worker, replay) calls this."""
    source = str(event.get("source", "")) if scope == "source" else None
    return task_id_for(str(event.get("id")), handler, source)


class Publisher:
    """Turns events into ``pipeline.handle`` tasks on their tier's queue."""

    def __init__(self, runtime: ProducerWiring) -> None:
        self.rt = runtime
        settings = runtime.settings
        self._renderer = (RedisMessageRenderer(runtime.app, redact_paths=settings.redact_paths)
                          if settings.broker_is_redis else None)
        self._enqueuer = Enqueuer(runtime, self._renderer)
        self.depths = DepthCache(self.queue_depth, settings.admission_cache_s)
        self._tier_cache: dict[tuple[str, str], str] = {}  # (type, source) -> tier
        self._limits: dict[str, tuple[str, float, float]] = {}  # tier -> queue, hard, soft
        self._coalescers: dict[str, Coalescer[Event, PublishResult]] = {}  # batch_wait_ms tiers
        self._coalescers_lock = threading.Lock()

    @property
    def renderer(self) -> RedisMessageRenderer:
        """The Redis message renderer (Redis brokers only)."""
        if self._renderer is None:
            raise SetupError("message rendering is for Redis brokers")
        return self._renderer

    def validate(self, data: Item) -> Event:
        if isinstance(data, Event):
            data = data.model_dump(mode="json")
        return parse_event(data, max_payload_bytes=self.rt.settings.max_payload_bytes)

    def tier_for(self, event: Event) -> str:
        s = self.rt.settings
        if event.tier is not None:
            return classify(event, s.rules, s.tiers, s.default_tier)
        key = (event.type, event.source)
        tier = self._tier_cache.get(key)
        if tier is None:
            tier = classify(event, s.rules, s.tiers, s.default_tier)
            if len(self._tier_cache) < _CACHE_MAX_ENTRIES:
                self._tier_cache[key] = tier
        return tier

    def publish(self, data: Item) -> PublishResult:
        """Validate and enqueue one event; raises EventValidationError / BrokerUnavailable.

        On a tier with ``batch_size`` and ``batch_wait_ms`` the call waits up to
        ``batch_wait_ms`` for concurrent publishes to share its batch message.
        """
        event = self.validate(data)
        coalescer = self._coalescer(self.tier_for(event))
        if coalescer is not None:
            return coalescer.submit(event)
        return self._publish_events([event])[0]

    def _coalescer(self, tier: str) -> Coalescer[Event, PublishResult] | None:
        cfg = self.rt.settings.tier(tier)
        if cfg.batch_size <= 0 or cfg.batch_wait_ms <= 0 or self._renderer is None:
            return None
        with self._coalescers_lock:
            found = self._coalescers.get(tier)
            if found is None:
                found = self._coalescers[tier] = Coalescer(
                    self._publish_events, wait_s=cfg.batch_wait_ms / 1000,
                    max_items=cfg.batch_size)
        return found

    def publish_many(self, items: Iterable[Item], *,
                     may_publish: Callable[[str], bool] | None = None) -> list[PublishResult]:
        """Validate and enqueue many events in batched round trips; one result per item.

        Invalid items are ``rejected`` (reason ``invalid``, ``errors`` naming every
        field) while the valid ones go through; so is an event whose source
        ``may_publish`` refuses (reason ``forbidden_source``: an API token limited to
        other sources), before its idempotency key is claimed. Raises
        BrokerUnavailable for a chunk the broker did not take; chunks before it stay
        accepted.
        """
        results: list[PublishResult] = []
        it = iter(items)
        while chunk := list(itertools.islice(it, self.rt.settings.publish_batch_size)):
            slots: list[PublishResult | None] = []
            valid: list[Event] = []
            invalid: list[PublishResult] = []
            for item in chunk:
                try:
                    event = self.validate(item)
                except EventValidationError as exc:
                    invalid.append(PublishResult(id=_raw_id(item), tier=None, outcome="rejected",
                                                 reason="invalid", errors=exc.as_dicts()))
                    slots.append(invalid[-1])
                    continue
                if may_publish is not None and not may_publish(event.source):
                    invalid.append(_forbidden(event))
                    slots.append(invalid[-1])
                    continue
                valid.append(event)
                slots.append(None)
            self._notify(invalid)
            if len(chunk) == 1 and len(valid) == 1:  # a lone event (POST /events) may coalesce
                coalescer = self._coalescer(self.tier_for(valid[0]))
                if coalescer is not None:
                    results.append(coalescer.submit(valid[0]))
                    continue
            try:
                published = iter(self._publish_events(valid))
            except BrokerUnavailable as exc:
                exc.results = results  # what earlier chunks got: those stay accepted
                raise
            results.extend(slot or next(published) for slot in slots)
        return results

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker (and state store) answer."""
        try:
            self.rt.state.ping()
            if not self.rt.settings.broker_is_redis:
                with self.rt.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=0)
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise unavailable(self.rt.settings.effective_broker_url, exc) from exc

    def enqueue(self, event: Event, tier: str, handlers: Sequence[Handler]) -> list[str]:
        """Enqueue ``event``'s tasks without admission or dedupe (worker-side fan-out)."""
        plan = self._plan(event, tier, [h.name for h in handlers])
        self.send(plan.specs)
        return [s.task_id for s in plan.specs]

    def send(self, specs: Iterable[TaskSpec]) -> None:
        """Publish task messages with Celery's own path (confirmed on RabbitMQ)."""
        self._enqueuer.send(specs)

    def spec(self, event: dict[str, Any], *, handler: str, tier: str, task_id: str,
             attempt: int, first_failed_at: str | None = None,
             priority: int | None = None, accepted_at: float | None = None) -> TaskSpec:
        """The task message for one attempt; ``accepted_at`` (epoch s) is carried from
        the first publish through every retry, for end-to-end latency."""
        queue, hard_s, soft_s = self._tier_limits(tier)
        kwargs: dict[str, Any] = {"handler": handler, "tier": tier, "attempt": attempt,
                                  "accepted_at": accepted_at or time.time(),
                                  # every publish starts its own lineage of tries: settle
                                  # marks of an earlier publish of this task never match
                                  "lineage": uuid.uuid4().hex[:12]}
        if first_failed_at:
            kwargs["first_failed_at"] = first_failed_at
        return TaskSpec(queue, task_id, [event], kwargs, priority, hard_s, soft_s)

    def _tier_limits(self, tier: str) -> tuple[str, float, float]:
        found = self._limits.get(tier)
        if found is None:
            cfg = self.rt.settings.tier(tier)
            found = self._limits[tier] = (cfg.queue_name(tier), cfg.time_limit_s,
                                          cfg.soft_time_limit_s)
        return found

    def queue_depth(self, tier: str) -> int:
        """Messages waiting in ``tier``'s queue (priority sub-queues included); 0 for
        a RabbitMQ queue not declared yet."""
        return self.queue_reading(tier)[0]

    def queue_reading(self, tier: str) -> tuple[int, bool]:
        """``(depth, declared)`` of ``tier``'s queue: on RabbitMQ a queue no worker has
        declared yet is ``(0, False)``; a Redis list always exists."""
        queue = self.rt.settings.queue_for(tier)
        try:
            if self.rt.settings.broker_is_redis:
                pipe = self.rt.state.pipeline(transaction=False)
                for pri in range(10):
                    pipe.llen(redis_list_key(queue, pri))
                return int(sum(pipe.execute())), True
            with self.rt.app.connection_for_read() as conn:
                depth = passive_depth(conn, queue)
                return (0, False) if depth is None else (depth, True)
        except (redis.RedisError, OperationalError, OSError) as exc:
            raise unavailable(self.rt.settings.effective_broker_url, exc) from exc

    def _plan(self, event: Event, tier: str, handlers: list[str]) -> Planned:
        names = handlers or [FAN_OUT_HANDLER]
        message = event.to_message()
        event_id = message["id"]
        scope = self.rt.settings.idempotency_scope
        specs = [self.spec(message, handler=name, tier=tier,
                           task_id=event_task_id(message, name, scope),
                           attempt=1, priority=event.priority) for name in names]
        return Planned(event, event_id, tier, handlers, specs)

    def _publish_events(self, events: list[Event]) -> list[PublishResult]:
        if not events:
            return []
        plans = []
        for event in events:
            tier = self.tier_for(event)
            plans.append(self._plan(event, tier, [h.name for h in registry.for_type(event.type)]))
        admitted_plans, rejected = self._admit(plans)
        claims = self._enqueuer.claim_and_send(admitted_plans)
        outcome: dict[int, PublishResult] = {}
        for plan in rejected:
            outcome[id(plan)] = PublishResult(id=plan.event_id, tier=plan.tier,
                                              outcome="rejected", reason=TIER_FULL,
                                              type=plan.event.type)
        counts: Counter[str] = Counter()
        for plan, claim in zip(admitted_plans, claims, strict=True):
            if claim is Claim.IN_FLIGHT:  # another publish of it is unconfirmed: retry later
                outcome[id(plan)] = PublishResult(id=plan.event_id, tier=plan.tier,
                                                  outcome="rejected", reason=IN_FLIGHT,
                                                  type=plan.event.type)
                continue
            if claim is Claim.FRESH:
                counts[plan.tier] += len(plan.specs)
            outcome[id(plan)] = PublishResult(
                id=plan.event_id, tier=plan.tier, type=plan.event.type,
                outcome="accepted" if claim is Claim.FRESH else "duplicate",
                task_ids=[s.task_id for s in plan.specs], handlers=plan.handlers,
            )
        for tier, n in counts.items():
            self.depths.added(tier, n)
        results = [outcome[id(plan)] for plan in plans]
        self._notify(results)
        return results

    def _notify(self, results: Sequence[PublishResult]) -> None:
        """Count ``results`` where the exporter reads them, then tell the listeners."""
        if results:
            ingestcounts.add(self.rt.state, results)
            _notify(results)

    def _admit(self, plans: list[Planned]) -> tuple[list[Planned], list[Planned]]:
        wanted = Counter(p.tier for p in plans)
        room = {}
        for tier, n in wanted.items():
            cfg = self.rt.settings.tier(tier)
            bounded = cfg.max_depth > 0 and cfg.overflow == "reject"
            depth = self.depths.depth(tier) if bounded else 0  # no broker read when unbounded
            room[tier] = admitted(depth, n, max_depth=cfg.max_depth, overflow=cfg.overflow)
        taken, refused = [], []
        for plan in plans:
            if room[plan.tier] > 0:
                room[plan.tier] -= 1
                taken.append(plan)
            else:
                refused.append(plan)
        return taken, refused



#: Called with the results of every publish (metrics hang off this).
publish_listeners: list[Callable[[Sequence[PublishResult]], None]] = []


def _notify(results: Sequence[PublishResult]) -> None:
    for listener in publish_listeners:
        try:
            listener(results)
        except Exception:  # an observer must never break publishing
            logging.getLogger(__name__).exception("publish listener failed")


def _forbidden(event: Event) -> PublishResult:
    return PublishResult(id=str(event.id), tier=None, outcome="rejected", type=event.type,
                         reason=FORBIDDEN_SOURCE, errors=[{
                             "field": "source", "value": event.source,
                             "message": "this token may not publish events for this source"}])


def _raw_id(item: Item) -> str | None:
    if isinstance(item, Mapping):
        value = item.get("id")
        return str(value) if value is not None else None
    return None
