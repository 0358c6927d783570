"""A command interrupted between its send and its reply (an exception raised into the
thread: a soft time limit, gevent's hard limit) must not hand its reply to the next
command on the same connection. Against the suite's real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.core.state import connect


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = connect(redis_url)
    yield c
    c.close()


def interrupted_incr(client: redis.Redis, key: str) -> None:
    """What redis-py does when an exception lands after the send: the connection goes
    back to the pool with the reply unread."""
    pool = client.connection_pool
    conn = pool.get_connection()
    conn.send_command("INCR", key)  # type: ignore[no-untyped-call]
    pool.release(conn)


def test_the_next_command_reads_its_own_reply_not_the_interrupted_ones(
    client: redis.Redis,
) -> None:
    counter, other = f"c-{uuid.uuid4().hex}", f"o-{uuid.uuid4().hex}"
    client.set(other, "mine")
    interrupted_incr(client, counter)
    assert client.get(other) == b"mine"  # not the INCR's 1
    assert client.get(counter) == b"1"  # the interrupted command itself was applied


def test_a_pipeline_after_an_interrupted_command_reads_its_own_replies(
    client: redis.Redis,
) -> None:
    counter, other = f"c-{uuid.uuid4().hex}", f"o-{uuid.uuid4().hex}"
    interrupted_incr(client, counter)
    pipe = client.pipeline(transaction=False)
    pipe.set(other, "x")
    pipe.get(other)
    assert pipe.execute() == [True, b"x"]


def test_a_script_after_an_interrupted_command_gets_its_own_reply(
    client: redis.Redis,
) -> None:
    script = client.register_script("return {1, 2}")  # the shape begin and settle parse
    interrupted_incr(client, f"c-{uuid.uuid4().hex}")
    assert script() == [1, 2]
