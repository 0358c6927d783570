"""What one publish reports per event: :class:`PublishResult`.

``accepted`` (on the broker), ``duplicate`` (its idempotency key was claimed within
the window) or ``rejected`` with a reason: ``invalid`` (with every field's error),
``forbidden_source`` (:data:`FORBIDDEN_SOURCE`), ``tier_full`` or ``in_flight``.
Nothing is ``accepted`` that is not on the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.events import Event

__all__ = ["FORBIDDEN_SOURCE", "PublishResult", "forbidden"]

FORBIDDEN_SOURCE = "forbidden_source"  # rejection reason: the caller may not publish for it


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


def forbidden(event: Event) -> PublishResult:
    """The rejection of ``event``: the caller may not publish for its source."""
    return PublishResult(id=str(event.id), tier=None, outcome="rejected", type=event.type,
                         reason=FORBIDDEN_SOURCE, errors=[{
                             "field": "source", "value": event.source,
                             "message": "this token may not publish events for this source"}])

