"""Every error the pipeline raises on purpose derives from :class:`PipelineError`.

Hierarchy::

    PipelineError
    ├── ValidationError          bad input: names every offending field and value
    │   ├── EventValidationError     an event envelope failed validation
    │   └── ConfigError              a configuration file or variable is wrong
    ├── BrokerUnavailable        the broker (or state store) could not be reached
    └── HandlerError             raised by handlers to steer what happens next
        ├── PermanentError           never retried: straight to the dead-letter queue
        └── RetryAfter               retry after a delay the handler chooses
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "EventValidationError",
    "FieldProblem",
    "HandlerError",
    "PermanentError",
    "PipelineError",
    "RetryAfter",
    "ValidationError",
]

_VALUE_REPR_MAX_CHARS = 80  # longest rendering of an offending value in a message


class PipelineError(Exception):
    """Root of the pipeline's exceptions."""


@dataclass(frozen=True)
class FieldProblem:
    """One offending field: its dotted path, the value it had, and what is wrong."""

    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = repr(self.value)
        if len(shown) > _VALUE_REPR_MAX_CHARS:
            shown = shown[: _VALUE_REPR_MAX_CHARS - 3] + "..."
        return f"{self.field}={shown}: {self.message}"


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
        return [
            {"field": p.field, "value": _jsonable(p.value), "message": p.message}
            for p in self.problems
        ]


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


class HandlerError(PipelineError):
    """Base of the exceptions a handler raises to steer retry behaviour."""


class PermanentError(HandlerError):
    """The work can never succeed as it is: dead-letter it now, without retrying."""


class RetryAfter(HandlerError):
    """Retry after ``delay_s`` seconds (e.g. a downstream answered ``Retry-After``)."""

    def __init__(self, delay_s: float, message: str = "") -> None:
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)
        super().__init__(message or f"retry requested in {self.delay_s:g}s")


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return repr(value)
