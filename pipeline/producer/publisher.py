"""Publishing: validate -> classify -> admit -> dedupe -> fan out per handler -> enqueue.

:meth:`Publisher.publish_many` is the fast path. Each chunk of
``publish_batch_size`` events is validated, classified, admitted and planned
(:mod:`pipeline.producer.planning`), then claimed and enqueued in one round trip by
:mod:`pipeline.producer.enqueue`; the results (:mod:`pipeline.producer.results`) are
counted and told to :data:`publish_listeners`.

Nothing is reported ``accepted`` that is not on the broker: if the broker cannot
be reached, :class:`~pipeline.errors.BrokerUnavailable` is raised for the chunk.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import redis
from kombu.exceptions import OperationalError

from pipeline.core.admission import TIER_FULL, DepthCache
from pipeline.core.events import Event
from pipeline.core.handlers import Handler, registry
from pipeline.errors import BrokerUnavailable, EventValidationError, SetupError
from pipeline.messages.task import RedisMessageRenderer, TaskSpec, redis_list_key
from pipeline.producer import counts as ingestcounts
from pipeline.producer.coalesce import Coalescer
from pipeline.producer.enqueue import IN_FLIGHT, Claim, Enqueuer, unavailable
from pipeline.producer.planning import Item, Planner, raw_id
from pipeline.producer.queuedepth import passive_depth
from pipeline.producer.results import PublishResult, forbidden
from pipeline.producer.wiring import ProducerWiring

# FORBIDDEN_SOURCE, PublishResult and the task ids are this module's public names too
__all__ = ["Publisher", "publish_listeners"]


class Publisher(Planner):
    """Turns events into ``pipeline.handle`` tasks on their tier's queue."""

    def __init__(self, runtime: ProducerWiring) -> None:
        super().__init__(runtime, DepthCache(self.queue_depth, runtime.settings.admission_cache_s))
        settings = runtime.settings
        self._renderer = (RedisMessageRenderer(runtime.app, redact_paths=settings.redact_paths)
                          if settings.broker_is_redis else None)
        self._enqueuer = Enqueuer(runtime, self._renderer)
        self._coalescers: dict[str, Coalescer[Event, PublishResult]] = {}  # batch_wait_ms tiers
        self._coalescers_lock = threading.Lock()

    @property
    def renderer(self) -> RedisMessageRenderer:
        """The Redis message renderer (Redis brokers only)."""
        if self._renderer is None:
            raise SetupError("message rendering is for Redis brokers")
        return self._renderer

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
                    invalid.append(PublishResult(id=raw_id(item), tier=None, outcome="rejected",
                                                 reason="invalid", errors=exc.as_dicts()))
                    slots.append(invalid[-1])
                    continue
                if may_publish is not None and not may_publish(event.source):
                    invalid.append(forbidden(event))
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


#: Called with the results of every publish (metrics hang off this).
publish_listeners: list[Callable[[Sequence[PublishResult]], None]] = []


def _notify(results: Sequence[PublishResult]) -> None:
    for listener in publish_listeners:
        try:
            listener(results)
        except Exception:  # an observer must never break publishing
            logging.getLogger(__name__).exception("publish listener failed")
