"""Publishing: validate -> classify -> fan out per handler -> enqueue.

:func:`publish` returns only once every task of the event is on the broker; if
the broker cannot be reached it raises :class:`~pipeline.errors.BrokerUnavailable`
and the event is not reported accepted.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kombu.exceptions import OperationalError

from pipeline.errors import BrokerUnavailable
from pipeline.events import Event, parse_event
from pipeline.handlers import Handler, registry
from pipeline.schedule import TaskSpec
from pipeline.tiers import classify

if TYPE_CHECKING:
    from pipeline.runtime import Runtime

__all__ = ["PublishResult", "Publisher", "task_id_for"]

_TASK_NAMESPACE = uuid.UUID("6a1f0b7e-3c4d-4f5a-8b9c-0d1e2f3a4b5c")  # uuid5 namespace for task ids
FAN_OUT_HANDLER = ""  # handler name of a task that asks the worker to fan out


@dataclass(frozen=True)
class PublishResult:
    """What happened to one event."""

    id: str
    tier: str
    outcome: str = "accepted"
    task_ids: list[str] = field(default_factory=list)
    handlers: list[str] = field(default_factory=list)


def task_id_for(event_id: uuid.UUID | str, handler: str) -> str:
    """Deterministic task id for (event, handler): a re-publish reuses it."""
    return str(uuid.uuid5(_TASK_NAMESPACE, f"{event_id}/{handler}"))


class Publisher:
    """Turns events into ``pipeline.handle`` tasks on their tier's queue."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def validate(self, data: Event | Mapping[str, Any] | str | bytes) -> Event:
        if isinstance(data, Event):
            data = data.model_dump(mode="json")
        return parse_event(data, max_payload_bytes=self.rt.settings.max_payload_bytes)

    def tier_for(self, event: Event) -> str:
        s = self.rt.settings
        return classify(event, s.rules, s.tiers, s.default_tier)

    def publish(self, data: Event | Mapping[str, Any] | str | bytes) -> PublishResult:
        """Validate and enqueue one event (raises EventValidationError / BrokerUnavailable)."""
        event = self.validate(data)
        tier = self.tier_for(event)
        handlers = registry.for_type(event.type)
        task_ids = self.enqueue(event, tier, handlers)
        return PublishResult(id=str(event.id), tier=tier, task_ids=task_ids,
                             handlers=[h.name for h in handlers])

    def enqueue(self, event: Event, tier: str, handlers: Sequence[Handler]) -> list[str]:
        """One task per handler; with no known handler, one task the worker fans out."""
        names = [h.name for h in handlers] or [FAN_OUT_HANDLER]
        message = event.to_message()
        specs = [
            self.spec(message, handler=name, tier=tier, task_id=task_id_for(event.id, name),
                      attempt=1, priority=event.priority)
            for name in names
        ]
        self.send(specs)
        return [s.task_id for s in specs]

    def spec(self, event: dict[str, Any], *, handler: str, tier: str, task_id: str,
             attempt: int, first_failed_at: str | None = None,
             priority: int | None = None) -> TaskSpec:
        cfg = self.rt.settings.tier(tier)
        kwargs: dict[str, Any] = {"handler": handler, "tier": tier, "attempt": attempt}
        if first_failed_at:
            kwargs["first_failed_at"] = first_failed_at
        return TaskSpec(
            queue=cfg.queue_name(tier), task_id=task_id, args=[event], kwargs=kwargs,
            priority=priority, time_limit_s=cfg.time_limit_s,
            soft_time_limit_s=cfg.soft_time_limit_s,
        )

    def send(self, specs: Iterable[TaskSpec]) -> None:
        task = self.rt.app.tasks["pipeline.handle"]
        policy = {"max_retries": self.rt.settings.publish_max_retries, "interval_start": 0,
                  "interval_step": 0.5, "interval_max": 1.0}
        try:
            for spec in specs:
                task.apply_async(args=tuple(spec.args), kwargs=spec.kwargs, retry=True,
                                 retry_policy=policy, **spec.apply_async_options())
        except (OperationalError, ConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"broker {_redact(self.rt.settings.effective_broker_url)} unreachable: {exc}"
            ) from exc


def _redact(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else f"{scheme}://{user}@{host}"
