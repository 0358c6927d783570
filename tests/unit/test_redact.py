"""Redaction masks the fields a path names, in a copy, and nothing else."""

from __future__ import annotations

import base64
import copy
from typing import Any

import orjson
import pytest

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.redact import (
    MASK,
    path_problem,
    redact,
    redact_args,
    redact_record,
    redact_text,
    secrets_in,
)
from pipeline.errors import ConfigError
from pipeline.messages.task import RedisMessageRenderer, TaskSpec, args_repr

EVENT: dict[str, Any] = {"id": "e1", "type": "order.paid", "source": "shop",
                         "payload": {"card": {"number": "4111111111111111", "exp": "12/30"},
                                     "user": {"token": "tok-user", "email": "a@b.c"},
                                     "items": [{"sku": "x", "token": "tok-0"}, {"sku": "y"}],
                                     "deep": {"a": {"b": {"password": "hunter2"}}}}}


def test_an_exact_path_masks_that_field_only() -> None:
    out = redact(EVENT, ["payload.card.number"])
    assert out["payload"]["card"] == {"number": MASK, "exp": "12/30"}
    assert out["payload"]["user"] == EVENT["payload"]["user"]


def test_a_star_segment_matches_one_level_of_keys() -> None:
    out = redact(EVENT, ["payload.*.token"])
    assert out["payload"]["user"]["token"] == MASK
    assert out["payload"]["items"][0]["token"] == "tok-0"  # two levels down: not matched


def test_list_items_are_keys_a_star_matches() -> None:
    out = redact(EVENT, ["payload.items.*.token"])
    assert out["payload"]["items"] == [{"sku": "x", "token": MASK}, {"sku": "y"}]


def test_double_star_matches_any_depth() -> None:
    out = redact(EVENT, ["payload.**.token", "payload.**.password"])
    assert out["payload"]["user"]["token"] == MASK
    assert out["payload"]["items"][0]["token"] == MASK
    assert out["payload"]["deep"]["a"]["b"]["password"] == MASK


def test_a_matched_object_is_masked_whole_and_globs_match_key_parts() -> None:
    out = redact(EVENT, ["payload.ca*"])
    assert out["payload"]["card"] == MASK


def test_the_input_is_never_mutated_and_no_paths_is_identity() -> None:
    before = copy.deepcopy(EVENT)
    redact(EVENT, ["payload.**.token", "payload.card"])
    assert before == EVENT
    assert redact(EVENT, []) is EVENT


def test_ids_and_types_stay_and_missing_paths_change_nothing() -> None:
    out = redact(EVENT, ["payload.nope.x", "payload.card.number.deeper"])
    assert out == EVENT


def test_a_record_and_task_args_are_masked_through_the_same_function() -> None:
    record = {"id": "r1", "event": EVENT, "message": "boom"}
    assert redact_record(record, ["payload.card"])["event"]["payload"]["card"] == MASK
    batch = redact_args([[EVENT, EVENT]], ["payload.card"])
    assert [e["payload"]["card"] for e in batch[0]] == [MASK, MASK]
    assert redact_args([EVENT, {"x": 1}], ["payload.card"])[1] == {"x": 1}


@pytest.mark.parametrize("path", ["", "payload", "card.number", "payload..x", "id"])
def test_paths_outside_the_payload_are_refused(path: str) -> None:
    assert path_problem(path) is not None


def test_the_setting_refuses_a_bad_path_naming_the_field() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(redact_paths=["payload.ok", "type"])
    assert "redact_paths" in str(info.value)
    assert load_settings(redact_paths=["payload.**.token"]).redact_paths == ["payload.**.token"]


def spec() -> TaskSpec:
    return TaskSpec(queue="standard", task_id="3f1c2f7d-9a10-4b8e-9c55-0b5f4a4e8d0e",
                    args=[EVENT], kwargs={"handler": "h", "tier": "standard", "attempt": 1},
                    enqueued_at=1764400000.25)


def test_flowers_argsrepr_is_masked_on_both_publish_paths_while_the_body_is_whole() -> None:
    paths = ["payload.card.number", "payload.**.token"]
    app = create_app(load_settings(broker_url="redis://127.0.0.1:1/0"), main="redact-test")
    renderer = RedisMessageRenderer(app, redact_paths=paths)
    for render in (renderer.render, renderer.render_reference):
        _, payload = render(spec())
        doc = orjson.loads(payload)
        shown = doc["headers"]["argsrepr"]
        assert "4111111111111111" not in shown
        assert "tok-user" not in shown
        assert MASK in shown
        assert b"4111111111111111" in base64.b64decode(doc["body"])  # replayable
    options = spec().apply_async_options(paths)
    assert options["argsrepr"] == args_repr([EVENT], paths)
    assert "4111111111111111" not in options["argsrepr"]
    # without paths, as before: the arguments' JSON
    assert spec().apply_async_options()["argsrepr"] == orjson.dumps([EVENT]).decode()


def test_failure_text_masks_the_values_at_the_paths_wherever_they_appear() -> None:
    text = ("ValueError: card 4111111111111111 declined for {'email': 'a@b.c'} "
            "input_value='hunter2'")
    shown = redact_text(text, EVENT, ["payload.card.number", "payload.**.password"])
    assert shown == f"ValueError: card {MASK} declined for {{'email': 'a@b.c'}} " \
                    f"input_value='{MASK}'"


def test_a_matched_object_masks_each_of_its_values_in_text() -> None:
    assert redact_text("exp 12/30, no 4111111111111111", EVENT, ["payload.card"]) == \
        f"exp {MASK}, no {MASK}"


def test_values_shorter_than_a_few_characters_are_not_masked_in_text() -> None:
    event = {"payload": {"pin": "12", "code": 1234}}
    assert secrets_in(event, ["payload.pin", "payload.code"]) == ["1234"]
    assert redact_text("pin 12, code 1234", event, ["payload.*"]) == f"pin 12, code {MASK}"


def test_a_record_view_masks_its_message_and_traceback_too() -> None:
    data = {"event": EVENT, "message": "bad card 4111111111111111",
            "traceback": "Traceback ...\nValueError: bad card 4111111111111111\n"}
    shown = redact_record(data, ["payload.card.number"])
    assert shown["message"] == f"bad card {MASK}"
    assert "4111" not in shown["traceback"]
    assert data["message"] == "bad card 4111111111111111"  # the stored record is untouched
