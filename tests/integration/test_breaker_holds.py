"""Work an open breaker deferred is brought forward when it closes (the retry
schedule's holds), against the suite's real Redis: only entries still scheduled
later, never one the mover already moved, in chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.state import Keys
from pipeline.worker.schedule import RELEASE_CHUNK, RetrySchedule

NOW = time.time() + 3600  # "now" for release: an hour ahead of the clock the holds use


@pytest.fixture
def schedule(redis_url: str) -> Iterator[tuple[RetrySchedule, redis.Redis, str]]:
    client = redis.Redis.from_url(redis_url)
    app = create_app(load_settings(None, broker_url=redis_url), main="holds-test")
    yield RetrySchedule(app, client, atomic_move=True), client, f"api-{uuid.uuid4().hex[:6]}"
    client.close()


def scheduled(client: redis.Redis, key: str, member: bytes, due: float,
              s: RetrySchedule, downstream: str) -> None:
    client.zadd(key, {member: due})  # what the settle writes
    s.hold(downstream, key, member, due)


def test_release_makes_held_work_due_now_and_forgets_the_holds(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    for i in range(3):
        scheduled(client, key, f"m{i}".encode(), NOW + 30 + i, s, downstream)
    assert s.release(downstream, now=NOW) == 3
    assert [score for _, score in client.zrange(key, 0, -1, withscores=True)] == [NOW] * 3
    assert client.zcard(Keys.breaker_holds(downstream)) == 0


def test_release_leaves_alone_what_was_moved_or_is_due_already(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    scheduled(client, key, b"moved", NOW + 30, s, downstream)
    client.zrem(key, b"moved")  # the mover moved it (it came due, the breaker still open)
    client.zadd(key, {b"early": NOW - 5})  # due already, held by nothing
    scheduled(client, key, b"later", NOW + 60, s, downstream)
    assert s.release(downstream, now=NOW) == 1
    assert client.zscore(key, b"moved") is None  # not brought back
    assert client.zscore(key, b"early") == NOW - 5
    assert client.zscore(key, b"later") == NOW


def test_release_goes_through_more_holds_than_one_chunk(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    n = RELEASE_CHUNK * 2 + 7
    for i in range(n):
        scheduled(client, key, f"m{i}".encode(), NOW + 10 + i / 1000, s, downstream)
    assert s.release(downstream, now=NOW) == n
    assert client.zcount(key, "-inf", NOW) == n


def test_a_hold_for_another_downstream_is_not_released(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    scheduled(client, key, b"other", NOW + 30, s, downstream + "-other")
    assert s.release(downstream, now=NOW) == 0
    assert client.zscore(key, b"other") == NOW + 30
