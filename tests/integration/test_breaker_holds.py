"""Work an open breaker deferred is brought forward when it closes (the retry
schedule's holds), against the suite's real Redis: only entries still scheduled
later, never one the mover already moved, the latest accepted first, in chunks."""

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
    downstream = f"api-{uuid.uuid4().hex[:6]}"
    client.hset(Keys.breaker(downstream), "state", "open")  # work is held while it is
    yield RetrySchedule(app, client, atomic_move=True), client, downstream
    client.close()


def scheduled(client: redis.Redis, key: str, member: bytes, due: float,
              s: RetrySchedule, downstream: str, *, accepted: float = 0.0,
              task: str | None = None) -> None:
    client.zadd(key, {member: due})  # what the settle writes
    s.hold(downstream, task or member.decode(), (key, member), accepted or time.time())


def queued_order(client: redis.Redis, key: str) -> list[bytes]:
    """The due members in the order the mover queues them (lowest score first)."""
    return list(client.zrangebyscore(key, "-inf", NOW))  # type: ignore[arg-type]


def test_release_makes_held_work_due_now_and_forgets_the_holds(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    for i in range(3):
        scheduled(client, key, f"m{i}".encode(), NOW + 30 + i, s, downstream)
    assert s.release(downstream, now=NOW) == 3
    assert client.zcount(key, NOW - 3, NOW) == 3
    holds = Keys.breaker_holds(downstream)
    assert client.zcard(holds) == 0
    assert client.hlen(holds + ":entries") == 0


def test_release_queues_the_latest_accepted_first(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    accepted = [5.0, 1.0, 9.0, 3.0]  # due times in another order than acceptance
    for i, at in enumerate(accepted):
        scheduled(client, key, f"a{at:g}".encode(), NOW + 40 - i, s, downstream,
                  accepted=1e9 + at)
    assert s.release(downstream, now=NOW) == 4
    assert queued_order(client, key) == [b"a9", b"a5", b"a3", b"a1"]


def test_a_task_deferred_again_is_held_once_by_its_latest_entry(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    scheduled(client, key, b"try-0", NOW + 30, s, downstream, task="t1")
    client.zrem(key, b"try-0")  # the mover moved it; it ran and was deferred again
    scheduled(client, key, b"try-1", NOW + 50, s, downstream, task="t1")
    assert client.zcard(Keys.breaker_holds(downstream)) == 1
    assert s.release(downstream, now=NOW) == 1
    assert client.zscore(key, b"try-1") is not None
    assert client.zscore(key, b"try-1") <= NOW  # type: ignore[operator]


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
    assert client.zscore(key, b"later") <= NOW  # type: ignore[operator]


def test_release_goes_through_more_holds_than_one_chunk_newest_first(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    n = RELEASE_CHUNK * 2 + 7
    for i in range(n):
        scheduled(client, key, f"m{i}".encode(), NOW + 10 + i / 1000, s, downstream,
                  accepted=1e9 + i)
    assert s.release(downstream, now=NOW) == n
    assert queued_order(client, key) == [f"m{i}".encode() for i in reversed(range(n))]


def test_a_hold_for_another_downstream_is_not_released(
    schedule: tuple[RetrySchedule, redis.Redis, str],
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    client.hset(Keys.breaker(downstream + "-other"), "state", "open")
    scheduled(client, key, b"other", NOW + 30, s, downstream + "-other")
    assert s.release(downstream, now=NOW) == 0
    assert client.zscore(key, b"other") == NOW + 30


@pytest.mark.parametrize("closed_by", ["probe", "operator"])
def test_work_deferred_just_before_the_breaker_closed_is_due_at_once_not_held(
    schedule: tuple[RetrySchedule, redis.Redis, str], closed_by: str,
) -> None:
    s, client, downstream = schedule
    key = Keys.retries(f"q-{downstream}")
    client.zadd(key, {b"early": NOW + 30})
    assert s.hold(downstream, "early", (key, b"early"), time.time(), now=NOW) is True
    # the breaker closes and releases its holds; then the settle of a deferral its
    # half-open state (or the forced open) decided a moment before writes its hold
    if closed_by == "probe":
        client.hset(Keys.breaker(downstream), "state", "closed")
    else:
        client.hset(Keys.breaker(downstream), "forced", "closed")
    assert s.release(downstream, now=NOW) == 1
    client.zadd(key, {b"late": NOW + 30})
    assert s.hold(downstream, "late", (key, b"late"), time.time(), now=NOW) is False
    assert client.zscore(key, b"late") == NOW  # due now: no release is coming for it
    assert client.zcard(Keys.breaker_holds(downstream)) == 0
