"""The event envelope: what parse_event accepts and how it reports what it rejects."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from pipeline.core.events import DEFAULT_MAX_PAYLOAD_BYTES, parse_event
from pipeline.errors import EventValidationError


def valid(**fields: Any) -> dict[str, Any]:
    return {"type": "reward.granted", "source": "game-server", **fields}


def problem_fields(data: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(EventValidationError) as info:
        parse_event(data, **kwargs)
    return info.value.fields


def test_valid_event_gets_a_generated_uuid_id() -> None:
    first, second = parse_event(valid()), parse_event(valid())
    assert isinstance(first.id, uuid.UUID)
    assert first.id != second.id


def test_occurred_at_defaults_to_now_and_is_timezone_aware() -> None:
    before = datetime.now(UTC)
    event = parse_event(valid())
    after = datetime.now(UTC)
    assert event.occurred_at.tzinfo is not None
    assert before <= event.occurred_at <= after


def test_naive_occurred_at_is_rejected() -> None:
    assert problem_fields(valid(occurred_at="2024-05-01T12:00:00")) == ["occurred_at"]


def test_aware_occurred_at_is_kept() -> None:
    event = parse_event(valid(occurred_at="2024-05-01T12:00:00+02:00"))
    assert event.occurred_at == datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize("event_type", ["reward.granted", "a.b.c", "game_v2.state_update"])
def test_dotted_lowercase_types_with_two_or_more_segments_are_accepted(event_type: str) -> None:
    assert parse_event(valid(type=event_type)).type == event_type


@pytest.mark.parametrize(
    "event_type", ["reward", "Reward.Granted", "reward..granted", "reward.", "1reward.x", ""]
)
def test_types_that_are_not_dotted_lowercase_are_rejected(event_type: str) -> None:
    assert problem_fields(valid(type=event_type)) == ["type"]


def test_unknown_top_level_fields_are_rejected() -> None:
    assert problem_fields(valid(colour="blue")) == ["colour"]


@pytest.mark.parametrize("payload", [[1, 2], "text", 3])
def test_payload_must_be_a_json_object(payload: object) -> None:
    assert problem_fields(valid(payload=payload)) == ["payload"]


def test_payload_at_the_default_cap_is_accepted() -> None:
    overhead = len(json.dumps({"blob": ""}, separators=(",", ":")))
    blob = "x" * (DEFAULT_MAX_PAYLOAD_BYTES - overhead)
    assert parse_event(valid(payload={"blob": blob})).payload["blob"] == blob


def test_payload_over_the_default_256_kib_cap_is_rejected_naming_payload() -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event(valid(payload={"blob": "x" * DEFAULT_MAX_PAYLOAD_BYTES}))
    assert DEFAULT_MAX_PAYLOAD_BYTES == 256 * 1024
    assert info.value.fields == ["payload"]
    assert "262144-byte cap" in str(info.value)


def test_custom_max_payload_bytes_is_enforced() -> None:
    data = valid(payload={"blob": "x" * 100})
    assert parse_event(data).payload == data["payload"]
    with pytest.raises(EventValidationError) as info:
        parse_event(data, max_payload_bytes=50)
    assert info.value.fields == ["payload"]
    assert "50-byte cap" in str(info.value)


@pytest.mark.parametrize("priority", [0, 9])
def test_priority_bounds_are_inclusive(priority: int) -> None:
    assert parse_event(valid(priority=priority)).priority == priority


@pytest.mark.parametrize("priority", [-1, 10])
def test_priority_outside_0_to_9_is_rejected(priority: int) -> None:
    assert problem_fields(valid(priority=priority)) == ["priority"]


def test_invalid_event_error_names_every_offending_field_and_value() -> None:
    bad = {"type": "Reward", "source": "game-server", "priority": 12,
           "payload": [1], "colour": "blue"}
    with pytest.raises(EventValidationError) as info:
        parse_event(bad)
    exc = info.value
    assert sorted(exc.fields) == ["colour", "payload", "priority", "type"]
    for text in ("type='Reward'", "priority=12", "payload=[1]", "colour='blue'"):
        assert text in str(exc)


def test_as_dicts_lists_every_offending_field_with_its_value() -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event({"type": "Reward", "source": "game-server", "priority": 12, "colour": "blue"})
    by_field = {d["field"]: d for d in info.value.as_dicts()}
    assert {f: d["value"] for f, d in by_field.items()} == {
        "type": "Reward", "priority": 12, "colour": "blue"
    }
    assert all(d["message"] for d in by_field.values())
    json.dumps(info.value.as_dicts())  # JSON-friendly


def test_missing_required_fields_are_each_reported() -> None:
    assert sorted(problem_fields({})) == ["source", "type"]


@pytest.mark.parametrize("document", [
    b'{"type": "reward.granted", "source": "game-server"}',
    '{"type": "reward.granted", "source": "game-server"}',
])
def test_parse_event_accepts_a_json_document_as_bytes_or_str(document: str | bytes) -> None:
    assert parse_event(document).type == "reward.granted"


@pytest.mark.parametrize("document", ["{not json", b"\xff\xfe", "[1, 2]", "null"])
def test_a_document_that_is_not_a_json_object_is_reported_as_document(
    document: str | bytes,
) -> None:
    assert problem_fields(document) == ["<document>"]


def test_dedupe_key_prefers_the_idempotency_key() -> None:
    assert parse_event(valid(idempotency_key="grant-42")).dedupe_key == "grant-42"


def test_dedupe_key_falls_back_to_the_event_id() -> None:
    event = parse_event(valid())
    assert event.dedupe_key == str(event.id)


def test_a_missing_field_shows_no_value() -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event({"source": "game-server", "payload": {"big": "x" * 1000}})
    (problem,) = info.value.problems
    assert str(problem) == "type: Field required"
    assert info.value.as_dicts() == [{"field": "type", "message": "Field required"}]


def test_no_rendering_echoes_more_than_200_characters_of_a_value() -> None:
    huge = {"type": "demo.ok", "source": "s", "payload": {"blob": "x" * 10_000}}
    with pytest.raises(EventValidationError) as info:
        parse_event(huge, max_payload_bytes=100)
    (shown,) = info.value.as_dicts()
    assert shown["field"] == "payload"
    assert len(json.dumps(shown["value"])) < 260
    assert "more characters" in shown["value"]
    assert len(str(info.value)) < 300
    with pytest.raises(EventValidationError) as info:
        parse_event({"type": "T" * 5000, "source": "s"})
    assert len(info.value.as_dicts()[0]["value"]) < 260


def test_a_broken_one_line_document_names_its_column_not_a_line_inside_it() -> None:
    with pytest.raises(EventValidationError) as info:
        parse_event(b'{"type": "demo.ok", "source": "s"\n')
    message = info.value.problems[0].message
    assert message.startswith("not JSON: Expecting ',' delimiter at column 34"), message
    assert "line" not in message
