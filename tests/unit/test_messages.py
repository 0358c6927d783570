"""The fast message renderer produces kombu's Redis payload for pipeline.handle."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.messages.task import (
    REDIS_PRIORITY_SEP,
    RedisMessageRenderer,
    TaskSpec,
    redis_list_key,
)


@pytest.fixture
def renderer() -> RedisMessageRenderer:
    app = create_app(load_settings(broker_url="redis://127.0.0.1:1/0"), main="render-test")
    return RedisMessageRenderer(app)


def spec(**overrides: object) -> TaskSpec:
    fields: dict[str, object] = {
        "queue": "standard", "task_id": "3f1c2f7d-9a10-4b8e-9c55-0b5f4a4e8d0e",
        "args": [{"id": "e1", "type": "demo.ok", "payload": {"quote": '"x"', "n": 1}}],
        "kwargs": {"handler": "demo.ok", "tier": "standard", "attempt": 1},
        "priority": None, "time_limit_s": 5.0, "soft_time_limit_s": 4.0,
        "enqueued_at": 1764400000.25,
    }
    fields.update(overrides)
    return TaskSpec(**fields)  # type: ignore[arg-type]


def without_tag(payload: bytes) -> dict[str, object]:
    doc: dict[str, Any] = orjson.loads(payload)
    doc["properties"].pop("delivery_tag")
    return doc


@pytest.mark.parametrize("priority", [None, 0, 3, 9])
def test_fast_render_equals_the_reference_rendering(
    renderer: RedisMessageRenderer, priority: int | None
) -> None:
    fast_key, fast = renderer.render(spec(priority=priority))
    ref_key, ref = renderer.render_reference(spec(priority=priority))
    assert fast_key == ref_key
    assert without_tag(fast) == without_tag(ref)


def test_rendered_body_carries_args_kwargs_and_celery_embed(renderer: RedisMessageRenderer) -> None:
    _, payload = renderer.render(spec())
    doc = orjson.loads(payload)
    args, kwargs, embed = orjson.loads(base64.b64decode(doc["body"]))
    assert args[0]["payload"]["quote"] == '"x"'
    assert kwargs["handler"] == "demo.ok"
    assert set(embed) == {"callbacks", "errbacks", "chain", "chord"}
    assert doc["headers"]["task"] == "pipeline.handle"
    assert doc["headers"]["id"] == doc["properties"]["correlation_id"]
    assert doc["headers"]["timelimit"] == [5.0, 4.0]
    assert "e1" in doc["headers"]["argsrepr"]  # Flower's task search finds the event id
    assert doc["headers"]["pipeline_enqueued_at"] == 1764400000.25


def test_every_message_gets_its_own_delivery_tag(renderer: RedisMessageRenderer) -> None:
    tags = {orjson.loads(renderer.render(spec())[1])["properties"]["delivery_tag"]
            for _ in range(100)}
    assert len(tags) == 100


def test_priority_selects_kombus_sub_list() -> None:
    assert redis_list_key("bulk", None) == "bulk"
    assert redis_list_key("bulk", 0) == "bulk"
    assert redis_list_key("bulk", 4) == f"bulk{REDIS_PRIORITY_SEP}4"
    assert redis_list_key("bulk", 42) == f"bulk{REDIS_PRIORITY_SEP}9"
