"""Every error the pipeline raises on purpose derives from :class:`PipelineError`.

Hierarchy::

    PipelineError
    ├── ValidationError          bad input: names every offending field and value
    │   ├── EventValidationError     an event envelope failed validation
    │   └── ConfigError              a configuration file or variable is wrong
    ├── UsageError               a call the API does not allow (also a ValueError)
    │   ├── UnknownTier              a tier name that is not configured
    │   └── DuplicateHandler         a handler name another function already has
    ├── SetupError               not set up for what was asked (also a RuntimeError)
    │   ├── NotAttached              a Celery app with no pipeline attached
    │   ├── StateStoreMissing        no state store (a RabbitMQ broker needs state_url)
    │   ├── OutsideHandler           pipeline.current() outside a running handler
    │   └── ServerStartError         the local Redis-protocol server did not start
    ├── BrokerUnavailable        the broker (or state store) could not be reached
    └── HandlerError             raised by handlers to steer what happens next
        ├── PermanentError           never retried: straight to the dead-letter queue
        └── RetryAfter               retry after a delay the handler chooses

Subclasses elsewhere: ``stackfind.StaleStack`` (a ``ConfigError``), the task-state
verdicts of :mod:`pipeline.worker.taskstate`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NO_VALUE",
    "BrokerUnavailable",
    "ConfigError",
    "DuplicateHandler",
    "EventValidationError",
    "FieldProblem",
    "HandlerError",
    "NotAttached",
    "OutsideHandler",
    "PermanentError",
    "PipelineError",
    "RetryAfter",
    "ServerStartError",
    "SetupError",
    "StateStoreMissing",
    "UnknownTier",
    "UsageError",
    "ValidationError",
]

VALUE_REPR_MAX_CHARS = 80  # longest rendering of an offending value in a message
VALUE_JSON_MAX_CHARS = 200  # longest offending value echoed in JSON (HTTP, --json)


class _NoValue:
    """The value of a field that is missing: there is nothing to show."""

    def __repr__(self) -> str:
        return "<no value>"


#: The value of a :class:`FieldProblem` whose field is missing: messages show none.
NO_VALUE: Any = _NoValue()


class PipelineError(Exception):
    """Root of the pipeline's exceptions."""


@dataclass(frozen=True)
class FieldProblem:
    """One offending field: its dotted path, the value it had (:data:`NO_VALUE` when
    the field is missing), and what is wrong. Renderings clip the value: a message
    never echoes a large input back."""

    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        if self.value is NO_VALUE:
            return f"{self.field}: {self.message}"
        return f"{self.field}={clip(repr(self.value), VALUE_REPR_MAX_CHARS)}: {self.message}"

    @classmethod
    def of_pydantic(cls, err: Mapping[str, Any], value: Any, note: str = "") -> FieldProblem:
        """One of pydantic's errors (``exc.errors()``): its location dotted, ``value`` as
        the caller may show it, pydantic's message without its ``Value error,`` prefix
        (for ``extra_forbidden``, "unknown setting"), then ``note``."""
        field = ".".join(str(part) for part in err["loc"]) or "<document>"
        message = ("unknown setting" if err["type"] == "extra_forbidden"
                   else str(err["msg"]).removeprefix("Value error, "))
        return cls(field, value, message + note)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form: the value clipped to :data:`VALUE_JSON_MAX_CHARS`; no
        ``value`` key for a missing field."""
        if self.value is NO_VALUE:
            return {"field": self.field, "message": self.message}
        return {"field": self.field, "value": shown_value(self.value), "message": self.message}


class ValidationError(PipelineError, ValueError):
    """Input that cannot be accepted; ``problems`` lists every offending field."""

    what = "input"

    def __init__(self, problems: Iterable[FieldProblem]) -> None:
        self.problems: Sequence[FieldProblem] = tuple(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = "; ".join(str(p) for p in self.problems)
        return f"invalid {self.what}: {lines}"

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.problems]

    def as_dicts(self) -> list[dict[str, Any]]:
        """JSON-friendly form, for CLI ``--json`` output and HTTP responses."""
        return [p.as_dict() for p in self.problems]


class EventValidationError(ValidationError):
    """An event envelope failed validation; nothing was enqueued."""

    what = "event"


class ConfigError(ValidationError):
    """The configuration is wrong; each problem names the setting and where it came from."""

    what = "configuration"

    def _render(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  {p}" for p in self.problems)


class BrokerUnavailable(PipelineError, ConnectionError):
    """The broker or the state store could not be reached; nothing was reported accepted.

    From ``publish_many``, ``results`` holds the outcomes of the chunks before the
    failed one (those stay accepted).
    """

    results: list[Any]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.results = []


class UsageError(PipelineError, ValueError):
    """A call the API does not allow: a programming error, not bad input."""


class UnknownTier(UsageError):
    """A tier name that is not configured."""


class DuplicateHandler(UsageError):
    """A handler name that another function already registered."""


class SetupError(PipelineError, RuntimeError):
    """The pipeline is not set up for what was asked."""


class NotAttached(SetupError):
    """A Celery app that has no pipeline attached (``pipeline.attach(app)``)."""


class StateStoreMissing(SetupError):
    """No state store configured: a RabbitMQ broker needs ``state_url``."""


class OutsideHandler(SetupError):
    """``pipeline.current()`` called outside a running handler."""


class ServerStartError(SetupError):
    """The local Redis-protocol server (``pipeline up``, the tests) did not start."""


class HandlerError(PipelineError):
    """Base of the exceptions a handler raises to steer retry behaviour."""


class PermanentError(HandlerError):
    """The work can never succeed as it is: dead-letter it now, without retrying."""


class RetryAfter(HandlerError):
    """Retry after ``delay_s`` seconds (e.g. a downstream answered ``Retry-After``)."""

    def __init__(self, delay_s: float, message: str = "") -> None:
        if delay_s < 0:
            raise UsageError(f"delay_s must be >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)
        super().__init__(message or f"retry requested in {self.delay_s:g}s")


def clip(text: str, max_chars: int = VALUE_JSON_MAX_CHARS) -> str:
    """``text``, cut to ``max_chars`` with what was left out counted."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text) - max_chars} more characters)"


def shown_value(value: Any) -> Any:
    """``value`` as a JSON answer may echo it: itself when small, else its start as a
    clipped string (a 2 MB payload is never sent back)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return clip(value)
    if isinstance(value, list | dict):
        try:
            text = json.dumps(value, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
        return value if len(text) <= VALUE_JSON_MAX_CHARS else clip(text)
    return clip(repr(value))
