"""Publishing against an unreachable broker: validation first, then BrokerUnavailable."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery

from pipeline.config.load import load_settings
from pipeline.core.redisurl import redact
from pipeline.errors import BrokerUnavailable, EventValidationError
from pipeline.local.embedded import free_port
from pipeline.messages.taskids import event_task_id, task_id_for
from pipeline.producer.results import PublishResult

PASSWORD = "s3cret-pw"
EVENT = {"type": "reward.granted", "source": "game-server", "payload": {"user_id": 7}}


@pytest.fixture
def closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


@pytest.fixture
def dead_broker_app(closed_port: int) -> Celery:
    from pipeline.app import create_app  # imported late: it builds an app from the env

    url = f"redis://user:{PASSWORD}@127.0.0.1:{closed_port}/0"
    return create_app(load_settings(broker_url=url, publish_max_retries=0))


def publish(app: Celery, data: dict[str, Any]) -> PublishResult:
    from pipeline.worker.runtime import runtime_for

    return runtime_for(app).publisher.publish(data)


def test_publish_to_a_closed_port_raises_broker_unavailable_quickly(
    dead_broker_app: Celery,
) -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        publish(dead_broker_app, EVENT)
    assert time.monotonic() - started < 5.0


def test_broker_unavailable_names_the_url_with_the_password_redacted(
    dead_broker_app: Celery, closed_port: int,
) -> None:
    with pytest.raises(BrokerUnavailable) as info:
        publish(dead_broker_app, EVENT)
    assert f"redis://user:***@127.0.0.1:{closed_port}/0" in str(info.value)
    assert PASSWORD not in str(info.value)


def test_invalid_event_is_rejected_before_any_broker_contact(dead_broker_app: Celery) -> None:
    with pytest.raises(EventValidationError) as info:
        publish(dead_broker_app, {**EVENT, "type": "Not Valid"})
    assert info.value.fields == ["type"]


def test_publish_applies_the_configured_payload_cap(closed_port: int) -> None:
    from pipeline.app import create_app

    app = create_app(load_settings(broker_url=f"redis://127.0.0.1:{closed_port}/0",
                                   publish_max_retries=0, max_payload_bytes=10))
    with pytest.raises(EventValidationError) as info:
        publish(app, EVENT | {"payload": {"blob": "x" * 20}})
    assert info.value.fields == ["payload"]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("amqp://guest:pw@host//", "amqp://guest:***@host//"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
    ],
)
def test_redact_hides_only_the_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_task_id_is_deterministic_per_event_and_handler() -> None:
    assert task_id_for("e1", "h") == task_id_for("e1", "h")
    assert len({task_id_for("e1", "h"), task_id_for("e1", "g"), task_id_for("e2", "h")}) == 3


def test_the_same_event_id_from_two_sources_is_two_tasks() -> None:
    shop, games = {"id": "e1", "source": "shop"}, {"id": "e1", "source": "games"}
    assert event_task_id(shop, "h", "source") != event_task_id(games, "h", "source")
    assert event_task_id(shop, "h", "source") == task_id_for("e1", "h", "shop")


def test_global_scope_keeps_one_task_per_event_id_across_sources() -> None:
    shop, games = {"id": "e1", "source": "shop"}, {"id": "e1", "source": "games"}
    assert event_task_id(shop, "h", "global") == event_task_id(games, "h", "global")
    assert event_task_id(shop, "h", "global") == task_id_for("e1", "h")
