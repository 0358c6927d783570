"""The event envelope: what producers send and what handlers receive.

An event is validated once, at the edge (:func:`parse_event`), and every problem is
reported together as an :class:`~pipeline.errors.EventValidationError` that names each
offending field and its value. Nothing is enqueued for an invalid event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import pydantic
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from pipeline.errors import NO_VALUE, EventValidationError, FieldProblem

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EVENT_ENVELOPE_MAX_BYTES",
    "EVENT_TYPE_PATTERN",
    "Event",
    "over_payload_cap",
    "parse_event",
]

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024  # payload cap when the config sets none: 256 KiB
# JSON of an event besides its payload can take at most this (names, key, id, time):
# a body over max_payload_bytes plus this is over the per-event cap unread
EVENT_ENVELOPE_MAX_BYTES = 4 * 1024
_OVER_CAP = "-byte cap"  # how the payload cap's message ends (see over_payload_cap)
EVENT_TYPE_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"  # dotted lowercase: reward.granted
# service name, host or URL-ish id; never "|", which Keys.seen puts after the source
SOURCE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/@\-]*$"
TIER_PATTERN = r"^[a-z][a-z0-9_\-]*$"  # tier names as declared in the config

_MAX_NAME_CHARS = 128  # longest type, source or tier name
_MAX_KEY_CHARS = 256  # longest idempotency key


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """An event, as accepted by :func:`pipeline.publish`.

    ``tier`` forces a tier when it names a known one; otherwise the config's
    classification rules choose. ``priority`` (0-9) is passed to the broker as
    Celery's message priority.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: Annotated[str, Field(pattern=EVENT_TYPE_PATTERN, max_length=_MAX_NAME_CHARS)]
    source: Annotated[str, Field(pattern=SOURCE_PATTERN, max_length=_MAX_NAME_CHARS)]
    occurred_at: AwareDatetime = Field(default_factory=_now)
    payload: dict[str, Any] = Field(default_factory=dict)
    tier: Annotated[str, Field(pattern=TIER_PATTERN, max_length=_MAX_NAME_CHARS)] | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=_MAX_KEY_CHARS)] | None = None
    priority: Annotated[int, Field(ge=0, le=9)] | None = None

    @field_validator("payload")
    @classmethod
    def _payload_within_cap(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        limit = DEFAULT_MAX_PAYLOAD_BYTES
        if isinstance(info.context, dict):
            limit = int(info.context.get("max_payload_bytes", limit))
        try:
            size = len(orjson.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"payload is not JSON-serialisable ({exc})") from None
        if size > limit:
            raise ValueError(f"payload is {size} bytes, over the {limit}{_OVER_CAP}")
        return value

    @property
    def dedupe_key(self) -> str:
        """What idempotency is keyed on: the idempotency key if given, else the id."""
        return self.idempotency_key or str(self.id)

    def to_message(self) -> dict[str, Any]:
        """The JSON-ready form carried inside Celery task arguments."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_event(
    data: Mapping[str, Any] | str | bytes,
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Event:
    """Validate ``data`` (a mapping or a JSON document) into an :class:`Event`.

    Raises :class:`EventValidationError` naming every offending field and value.
    """
    if type(data) is dict:  # the common case first: ABC isinstance checks are slow
        return _validate(data, max_payload_bytes)
    if isinstance(data, Event):
        data = data.model_dump()
    if isinstance(data, str | bytes):
        text = data
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EventValidationError(
                [FieldProblem("<document>", _clip(text), f"not JSON: {_where(exc)}")]
            ) from None
        except ValueError as exc:  # bytes that are not UTF-8
            raise EventValidationError(
                [FieldProblem("<document>", _clip(text), f"not JSON: {exc}")]
            ) from None
    if not isinstance(data, Mapping):
        raise EventValidationError(
            [FieldProblem("<document>", data, "an event must be a JSON object")]
        )
    return _validate(data, max_payload_bytes)


def _validate(data: Mapping[str, Any], max_payload_bytes: int) -> Event:
    try:
        return Event.model_validate(data, context={"max_payload_bytes": max_payload_bytes})
    except pydantic.ValidationError as exc:
        raise EventValidationError(problems_from_pydantic(exc)) from None


def problems_from_pydantic(exc: pydantic.ValidationError) -> list[FieldProblem]:
    """Turn pydantic's errors into :class:`FieldProblem` s (dotted field, value, message)."""
    # A missing field's "input" is the whole enclosing object: show no value.
    return [FieldProblem.of_pydantic(err, NO_VALUE if err["type"] == "missing"
                                     else err.get("input"))
            for err in exc.errors(include_url=False)]


def over_payload_cap(errors: list[dict[str, Any]]) -> bool:
    """Whether a rejection's errors (:meth:`FieldProblem.as_dict`) include the payload
    cap: HTTP answers such an event 413, as a body over the per-event cap."""
    return any(e["field"] == "payload" and e["message"].endswith(_OVER_CAP) for e in errors)


def _where(exc: json.JSONDecodeError) -> str:
    """The decoder's complaint and where: "column C" in a one-line document (an NDJSON
    line, whose file line the caller names), else "line L column C"."""
    line = exc.doc.rstrip("\r\n")
    if "\n" not in line:  # the end of the line, not "line 2 column 1" after its newline
        return f"{exc.msg} at column {min(exc.pos, len(line)) + 1}"
    return f"{exc.msg} at line {exc.lineno} column {exc.colno}"


def _clip(data: str | bytes) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text[:80]
