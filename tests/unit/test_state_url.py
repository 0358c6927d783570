"""A state store apart from a Redis broker is refused: work pushed there never runs."""

from __future__ import annotations

import pytest

from pipeline.config.load import check_settings, load_settings
from pipeline.core.redisurl import redact, same_redis
from pipeline.errors import FieldProblem

BROKER = "redis://:brokersecret@cache.example:6379/2"


def state_problems(broker_url: str, state_url: str) -> list[FieldProblem]:
    settings = load_settings(broker_url=broker_url, state_url=state_url)
    return [p for p in check_settings(settings) if p.field == "state_url"]


@pytest.mark.parametrize("state_url", [
    "redis://:brokersecret@cache.example:6379/2",
    "rediss://:brokersecret@cache.example:6379/2",
    "redis://CACHE.Example:6379/2",
    "redis://cache.example/2",
    "redis://cache.example/2/",
    "redis://user:other@cache.example:6379/2?ssl_cert_reqs=none&socket_timeout=3",
    "redis://cache.example:6379?db=2",
])
def test_the_broker_spelled_differently_is_accepted(state_url: str) -> None:
    assert state_problems(BROKER, state_url) == []


def test_defaults_for_port_and_db_match_an_explicit_6379_and_db_0() -> None:
    assert state_problems("redis://h", "redis://h:6379/0") == []
    assert state_problems("redis://h:6379/0", "redis://h/") == []


@pytest.mark.parametrize("state_url", [
    "redis://cache.example:6379/3",  # another database
    "redis://cache.example:6380/2",  # another port
    "redis://state.example:6379/2",  # another host
    "redis://cache.example:6379",  # db 0, not the broker's 2
    "redis://cache.example:6379/2?db=5",  # redis-py selects the query's db over the path
    "unix:///var/run/redis.sock",
    "sentinel://cache.example:26379/2",
])
def test_another_redis_is_refused(state_url: str) -> None:
    (problem,) = state_problems(BROKER, state_url)
    assert "one atomic step" in problem.message
    assert "unset state_url" in problem.message


def test_unset_state_url_uses_the_broker_and_is_sound() -> None:
    settings = load_settings(broker_url=BROKER)
    assert check_settings(settings) == []
    assert settings.effective_state_url == BROKER


def test_refusal_names_both_urls_without_their_passwords() -> None:
    (problem,) = state_problems(BROKER, "redis://admin:statesecret@state.example:6379/2")
    text = str(problem)
    assert text.startswith("state_url=")
    assert "state.example:6379/2" in text
    assert "cache.example:6379/2" in text
    assert "statesecret" not in text
    assert "brokersecret" not in text


def test_unset_broker_is_the_default_local_redis() -> None:
    assert state_problems("", "redis://127.0.0.1:6379/0") == []
    assert len(state_problems("", "redis://127.0.0.1:6379/1")) == 1


def test_sentinel_broker_accepts_only_the_identical_state_url() -> None:
    broker = "sentinel://:pw@s1:26379;sentinel://:pw@s2:26379"
    assert state_problems(broker, broker) == []
    assert len(state_problems(broker, "sentinel://:pw@s1:26379")) == 1
    assert len(state_problems(broker, "redis://s1:6379/0")) == 1


def test_amqp_broker_takes_any_redis_state_url() -> None:
    settings = load_settings(broker_url="amqp://guest:guest@rabbit:5672//",
                             state_url="redis://state.example:6379/4")
    assert check_settings(settings) == []


def test_same_redis_compares_host_port_and_db_only() -> None:
    assert same_redis("rediss://H:6379/0?ssl_cert_reqs=required", "redis://h")
    assert not same_redis("redis://h/0", "redis://h/1")
    assert not same_redis("redis://h:notaport/0", "redis://h/0")


def test_redact_masks_each_sentinel_password_and_query_passwords() -> None:
    shown = redact("sentinel://:a1@s1:26379;sentinel://u:b2@s2:26379/0?password=c3")
    assert not any(secret in shown for secret in ("a1", "b2", "c3"))
    assert shown.count("***") == 3
    assert redact("redis://user@h:6379/0") == "redis://user@h:6379/0"


def test_mask_urls_masks_every_url_in_a_text_and_leaves_the_rest() -> None:
    from pipeline.core.redisurl import mask_urls

    text = ("a redis://:p1@h:6379/0, b amqp://guest:p2@rabbit:5672// "
            "c rediss://h/1?password=p3&ssl_cert_reqs=required d redis://:p4@[::1:6379/0")
    shown = mask_urls(text)
    for secret in ("p1", "p2", "p3", "p4"):
        assert f"{secret}@" not in shown
        assert f"={secret}" not in shown
    assert shown.startswith("a redis://:***@h:6379/0, b amqp://guest:***@rabbit:5672// c ")
    assert mask_urls("no url, redis://h:6379/0 and redis://user@h") == \
        "no url, redis://h:6379/0 and redis://user@h"


def test_broker_unavailable_names_the_broker_without_its_password() -> None:
    from pipeline.producer.enqueue import unavailable

    exc = unavailable("redis://:hunter2@h:6379/0",
                      OSError("Error connecting to redis://:hunter2@h:6379/0"))
    assert "hunter2" not in str(exc)
    assert "redis://:***@h:6379/0" in str(exc)
