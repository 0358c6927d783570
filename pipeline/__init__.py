"""Tiered, loss-free event processing on Celery.

Events are validated, classified into priority tiers and become Celery tasks on
per-tier queues; failures retry with bounded, durable backoff and end in a
dead-letter queue with everything needed to replay them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pipeline.app as _default_app
from pipeline.app import attach, create_app
from pipeline.config.load import Settings, load_settings
from pipeline.core.events import Event, parse_event
from pipeline.core.handlers import HandlerContext, current, handler
from pipeline.errors import (
    BrokerUnavailable,
    ConfigError,
    EventValidationError,
    FieldProblem,
    HandlerError,
    PermanentError,
    PipelineError,
    RetryAfter,
    ValidationError,
)
from pipeline.producer.results import PublishResult
from pipeline.worker.runtime import runtime_for as _runtime_for

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.producer.publisher import Publisher

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "Event",
    "EventValidationError",
    "FieldProblem",
    "HandlerContext",
    "HandlerError",
    "PermanentError",
    "PipelineError",
    "PublishResult",
    "RetryAfter",
    "Settings",
    "ValidationError",
    "attach",
    "create_app",
    "current",
    "handler",
    "load_settings",
    "parse_event",
    "publish",
    "publish_many",
]

__version__ = "0.1.0"


def publish(event: Event | Mapping[str, Any] | str | bytes, *,
            app: Celery | None = None) -> PublishResult:
    """Validate, classify and enqueue one event with ``app`` (an app the pipeline is
    attached to; default: the pipeline's own, ``pipeline.app``).

    Raises :class:`EventValidationError` (nothing enqueued) or
    :class:`BrokerUnavailable` (not accepted).
    """
    return _publisher(app).publish(event)


def publish_many(events: Iterable[Event | Mapping[str, Any] | str | bytes], *,
                 app: Celery | None = None) -> list[PublishResult]:
    """Validate, classify and enqueue many events in batched round trips: one
    :class:`PublishResult` per event, in order (invalid ones ``rejected`` with their
    errors, the rest enqueued). Raises :class:`BrokerUnavailable` when the broker
    fails (its ``results`` hold the chunks accepted before)."""
    return _publisher(app).publish_many(events)


def _publisher(app: Celery | None) -> Publisher:
    return _runtime_for(_default_app.app if app is None else app).publisher
