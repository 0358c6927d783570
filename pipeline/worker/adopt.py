"""What :func:`pipeline.app.attach` takes from an existing Celery app and what it may
set on it: pure decisions, no I/O.

The app is the authority on its broker: the pipeline publishes, keeps its state
(unless ``state_url`` says otherwise) and runs its workers on the app's broker, and
a ``broker_url`` of the pipeline's that names another broker is refused rather than
followed. Transport options the app set, or inherits from kombu, are never lowered:
the visibility timeout is compared as the app's workers will see it (kombu's
default when unset). And every Redis priority sub-list the pipeline writes to
(``queue\\x06\\x16N`` for message priorities 0-9: events carry any, retries go one
step behind) must be one the app's consumers read, which with kombu's default
steps ``[0, 3, 6, 9]`` they do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kombu.transport import redis as kredis

from pipeline.core.redisurl import redact, same_broker
from pipeline.errors import FieldProblem

__all__ = ["PIPELINE_PRIORITIES", "PRIORITY_STEPS_FIELD", "app_broker_url", "broker_problem",
           "missing_priorities", "priority_problem", "raised_visibility"]

PIPELINE_PRIORITIES = range(10)  # message priorities the pipeline writes (events 0-9, retries +1)
KOMBU_VISIBILITY_TIMEOUT_S = float(kredis.Channel.visibility_timeout)  # kombu's Redis default
KOMBU_PRIORITY_STEPS = tuple(kredis.Channel.priority_steps)  # kombu's default steps [0, 3, 6, 9]
PRIORITY_STEPS_FIELD = "broker_transport_options.priority_steps"  # as a problem names it


def app_broker_url(conf_url: str | list[str] | None) -> str | None:
    """The app's ``broker_url`` as one string (a failover list joined by ``;``)."""
    if isinstance(conf_url, list | tuple):
        return ";".join(conf_url) or None
    return conf_url or None


def broker_problem(app_url: str, pipeline_url: str | None) -> FieldProblem | None:
    """A ``broker_url`` set for the pipeline that is not the app's broker.

    Events published there would be ``accepted`` where none of the app's workers read.
    """
    if pipeline_url is None or same_broker(app_url, pipeline_url):
        return None
    return FieldProblem(
        "broker_url", redact(pipeline_url),
        f"not the broker of the Celery app it is attached to ({redact(app_url)}): attach "
        "uses the app's broker; unset PIPELINE_BROKER_URL (or broker_url in the config) or "
        "make it name the same broker")


def raised_visibility(options: Mapping[str, Any], needed_s: float) -> float | None:
    """The visibility timeout to set, or ``None`` to leave the app's (set or inherited
    from kombu, :data:`KOMBU_VISIBILITY_TIMEOUT_S`) as it is: only ever raised."""
    current = options.get("visibility_timeout")
    effective = KOMBU_VISIBILITY_TIMEOUT_S if current is None else float(current)
    return needed_s if effective < needed_s else None


def missing_priorities(steps: Iterable[int] | None) -> list[int]:
    """The priorities the pipeline writes whose sub-list a consumer with these
    ``priority_steps`` (``None``: kombu's default) never reads."""
    read = set(KOMBU_PRIORITY_STEPS if steps is None else steps)
    return [p for p in PIPELINE_PRIORITIES if p not in read]


def priority_problem(options: Mapping[str, Any]) -> FieldProblem | None:
    """Transport options whose priority steps leave some pipeline sub-list unread."""
    steps = options.get("priority_steps")
    missing = missing_priorities(steps)
    if not missing:
        return None
    shown = list(KOMBU_PRIORITY_STEPS) if steps is None else list(steps)
    return FieldProblem(
        PRIORITY_STEPS_FIELD, shown,
        f"a consumer with these steps never reads the sub-lists of priorities {missing}, "
        "where the pipeline writes events of those priorities and retries (one step behind "
        f"fresh events): set priority_steps = {list(PIPELINE_PRIORITIES)}")
