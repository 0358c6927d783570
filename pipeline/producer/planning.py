"""Planning a publish: validate, classify, build each handler's task message, admit.

:class:`Planner` decides what a publish of some events will enqueue before any of it
is claimed or sent: each event validated (:func:`pipeline.core.events.parse_event`),
classified into its tier (rules cached per type and source), planned as one task
message per handler known here (a fan-out task when none is: the worker fans out) with
deterministic task ids (:mod:`pipeline.messages.taskids`), and admitted against its
tier's ``max_depth``. The :class:`~pipeline.producer.publisher.Publisher` builds on it
and does the I/O: claim, enqueue, count, notify.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from pipeline.core.admission import DepthCache, admitted
from pipeline.core.events import Event, parse_event
from pipeline.core.tiers import classify
from pipeline.messages.factory import MessageFactory
from pipeline.messages.taskids import event_task_id
from pipeline.producer.enqueue import Planned
from pipeline.producer.wiring import ProducerWiring

__all__ = ["FAN_OUT_HANDLER", "Item", "Planner", "raw_id"]

_CACHE_MAX_ENTRIES = 100_000  # classification results kept per publisher
FAN_OUT_HANDLER = ""  # handler name of a task that asks the worker to fan out
Item = Event | Mapping[str, Any] | str | bytes


class Planner:
    """Events into planned task messages, admitted or refused by their tier's depth."""

    def __init__(self, runtime: ProducerWiring, depths: DepthCache) -> None:
        self.rt = runtime
        self.depths = depths
        self._tier_cache: dict[tuple[str, str], str] = {}  # (type, source) -> tier
        self.messages = MessageFactory(runtime.settings)

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

    def _plan(self, event: Event, tier: str, handlers: list[str]) -> Planned:
        names = handlers or [FAN_OUT_HANDLER]
        message = event.to_message()
        event_id = message["id"]
        scope = self.rt.settings.idempotency_scope
        specs = [self.messages.spec(message, handler=name, tier=tier,
                           task_id=event_task_id(message, name, scope),
                           attempt=1, priority=event.priority) for name in names]
        return Planned(event, event_id, tier, handlers, specs)

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


def raw_id(item: Item) -> str | None:
    """The ``id`` of an item that did not validate, if it has one (for its result)."""
    if isinstance(item, Mapping):
        value = item.get("id")
        return str(value) if value is not None else None
    return None
