"""Tiered, loss-free event processing on Celery.

Events are validated, classified into priority tiers and become Celery tasks on
per-tier queues; failures retry with bounded, durable backoff and end in a
dead-letter queue with everything needed to replay them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.config import Settings, load_settings
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
from pipeline.events import Event, parse_event
from pipeline.handlers import HandlerContext, current, handler
from pipeline.ingest import PublishResult

__all__ = [
    # errors
    "BrokerUnavailable",
    "ConfigError",
    # events
    "Event",
    "EventValidationError",
    "FieldProblem",
    "HandlerContext",
    "HandlerError",
    "PermanentError",
    "PipelineError",
    "PublishResult",
    "RetryAfter",
    # configuration
    "Settings",
    "ValidationError",
    # handlers
    "current",
    "handler",
    "load_settings",
    "parse_event",
    # publishing
    "publish",
]

__version__ = "0.1.0"


def publish(event: Event | Mapping[str, Any] | str | bytes) -> PublishResult:
    """Validate, classify and enqueue one event with the default app (``pipeline.app``).

    Raises :class:`EventValidationError` (nothing enqueued) or
    :class:`BrokerUnavailable` (not accepted).
    """
    from pipeline.app import app
    from pipeline.runtime import runtime_for

    return runtime_for(app).publisher.publish(event)
