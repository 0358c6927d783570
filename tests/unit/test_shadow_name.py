"""Task messages carry ``pipeline.handle[<event type>]`` as Celery's shadow name."""

from __future__ import annotations

import orjson

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.messages.task import RedisMessageRenderer, TaskSpec, shadow_name


def spec(event: dict[str, object]) -> TaskSpec:
    return TaskSpec("standard", "3f1c2f7d-9a10-4b8e-9c55-0b5f4a4e8d0e", [event],
                    {"handler": "h", "tier": "standard", "attempt": 1}, None, 5.0, 4.0,
                    enqueued_at=1764400000.25)


def test_shadow_name_shows_the_event_type_and_falls_back_to_the_task_name() -> None:
    event = {"id": "e1", "type": "reward.granted"}
    assert shadow_name([event]) == "pipeline.handle[reward.granted]"
    assert shadow_name([{"id": "e1"}]) == "pipeline.handle"
    assert shadow_name([]) == "pipeline.handle"


def test_both_renderings_and_apply_async_carry_the_shadow_name() -> None:
    app = create_app(load_settings(broker_url="redis://127.0.0.1:1/0"), main="shadow-test")
    renderer = RedisMessageRenderer(app)
    one = spec({"id": "e1", "type": "game.level_up"})
    fast = orjson.loads(renderer.render(one)[1])
    reference = orjson.loads(renderer.render_reference(one)[1])
    assert fast["headers"]["shadow"] == reference["headers"]["shadow"] == \
        "pipeline.handle[game.level_up]"
    assert fast["headers"]["task"] == "pipeline.handle"  # what the worker runs
    assert one.apply_async_options()["shadow"] == "pipeline.handle[game.level_up]"
