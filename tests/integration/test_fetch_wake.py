"""An idle consumer of the reliable fetch wakes with its message in one round trip.

The channel is driven by hand against a real server: the fetch that finds nothing,
then the wait with the next fetch pipelined behind it, then the reply. Writes to the
socket are counted by wrapping the connection's own send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from queue import Empty
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from pipeline.worker import fetch
from pipeline.worker.fetchchannel import FETCH_WAIT_S
from pipeline.worker.inflight import inflight_key

QUEUE = "wake-test"


@pytest.fixture
def channel(redis_url: str) -> Iterator[Any]:
    fetch.install()
    redis.Redis.from_url(redis_url).flushdb()
    with Connection(redis_url) as conn:
        ch: Any = conn.channel()
        Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)(ch).declare()
        ch.client.connection = ch.client.connection_pool.get_connection()  # as kombu's poller
        yield ch
        ch.close()


def _publish(redis_url: str, body: str) -> None:
    with Connection(redis_url) as conn:
        Producer(conn).publish(body, exchange=QUEUE, routing_key=QUEUE, serializer="json")


def _count_writes(ch: Any) -> list[int]:
    writes: list[int] = []
    conn = ch.client.connection
    send = conn.send_packed_command

    def counted(command: Any, check_health: bool = True) -> None:
        writes.append(1)
        send(command, check_health)

    conn.send_packed_command = counted
    return writes


def _consume_idle(channel: Any) -> list[Any]:
    """Consume ``QUEUE`` and make one fetch that finds nothing: the next one waits
    first. Returns the list the delivered messages are appended to."""
    got: list[Any] = []
    channel.basic_consume(QUEUE, no_ack=False, callback=got.append, consumer_tag="t")
    channel._brpop_start()
    with pytest.raises(Empty):
        channel._brpop_read()
    return got


def test_idle_consumer_wakes_with_its_message_in_one_round_trip(
    channel: Any, redis_url: str,
) -> None:
    got = _consume_idle(channel)
    writes = _count_writes(channel)
    channel._brpop_start()  # the wait and the fetch, in one write
    threading.Timer(0.05, _publish, (redis_url, "hello")).start()
    assert channel._brpop_read() is True
    assert len(writes) == 1
    assert [m.payload for m in got] == ["hello"]
    tag = got[0].delivery_tag
    held = redis.Redis.from_url(redis_url, decode_responses=True).hkeys(
        inflight_key(channel._consumer))
    assert held == [tag]  # recorded in flight by the same fetch


def test_wait_that_times_out_fetches_other_sub_lists_in_the_same_round_trip(
    channel: Any, redis_url: str,
) -> None:
    got = _consume_idle(channel)
    # a message on a priority sub-list the wait does not watch (0 is kombu's highest)
    with Connection(redis_url) as conn:
        Producer(conn).publish("low", exchange=QUEUE, routing_key=QUEUE, serializer="json",
                               priority=9)
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0
    writes = _count_writes(channel)
    started = time.monotonic()
    channel._brpop_start()
    assert channel._brpop_read() is True
    assert time.monotonic() - started < FETCH_WAIT_S + 1.0
    assert len(writes) == 1
    assert [m.payload for m in got] == ["low"]
