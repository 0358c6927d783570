"""Task events are published without waiting for Redis: a real server, kept busy by a
long script, and a real subscriber."""

from __future__ import annotations

import functools
import operator
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.local.embedded import EmbeddedServer, start_server
from pipeline.worker.fanout import FanoutWriter
from tests.integration.support import wait_for

BUSY_S = 0.6  # how long the blocking script holds the server
# a script that keeps the (single-threaded) server busy for ARGV[1] seconds
BUSY_LUA = """
local t = redis.call('TIME')
local start = t[1] + t[2] / 1e6
repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 - start > tonumber(ARGV[1])
return 1
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    s = start_server(tmp_path / "broker", persist=False)
    yield s
    s.stop()


@pytest.fixture
def subscribed(server: EmbeddedServer) -> Iterator[tuple[redis.Redis, list[bytes]]]:
    """A client subscribed to ``events`` (in a thread) and what it has received."""
    client = redis.Redis.from_url(server.url)
    got: list[bytes] = []
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    pubsub.subscribe(events=lambda m: got.append(m["data"]))
    thread = pubsub.run_in_thread(sleep_time=0.01, daemon=True)
    yield client, got
    thread.stop()
    thread.join(5)
    pubsub.close()
    client.close()


def _busy(url: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: redis.Redis.from_url(url).eval(
        BUSY_LUA, 0, BUSY_S), daemon=True)
    thread.start()
    time.sleep(0.1)  # the script is running
    return thread


def test_a_publish_returns_while_redis_is_busy_and_arrives_once_it_is_free(
    server: EmbeddedServer, subscribed: tuple[redis.Redis, list[bytes]],
) -> None:
    url = server.url
    client, got = subscribed
    writer = FanoutWriter(client)
    writer.publish(["events"], "warm")  # connected before the server gets busy
    wait_for(lambda: got == [b"warm"], 5, "the first event")
    busy = _busy(url)
    started = time.monotonic()
    for i in range(3):
        writer.publish(["events"], f"e{i}")
    written_s = time.monotonic() - started
    waited = time.monotonic()
    client.publish("events", "sync")  # kombu's way: waits for the server
    sync_s = time.monotonic() - waited
    busy.join()
    assert written_s < BUSY_S / 3 < sync_s  # the control shows the server was busy
    wait_for(lambda: len(got) == 5, 5, "every event")
    assert got == [b"warm", b"e0", b"e1", b"e2", b"sync"]
    writer.close()
    assert writer.due == 0


def test_a_writer_whose_connection_was_closed_while_idle_sends_the_next_event_anew(
    server: EmbeddedServer, subscribed: tuple[redis.Redis, list[bytes]],
) -> None:
    client, got = subscribed
    writer = FanoutWriter(redis.Redis.from_url(server.url))
    for round_ in range(3):
        writer.publish(["events"], f"before{round_}")
        before, after = f"before{round_}".encode(), f"after{round_}".encode()
        wait_for(functools.partial(operator.contains, got, before), 5, "the event")
        if round_ == 1:
            writer.publish(["events"], "unread")  # a reply still due at the close
        publishers = [c for c in client.client_list() if c["cmd"] == "publish"]
        assert len(publishers) == 1
        client.client_kill_filter(_id=publishers[0]["id"])  # as a restarted server would
        time.sleep(0.1)  # the close has reached the writer's socket
        writer.publish(["events"], f"after{round_}")  # no error, and not lost
        wait_for(functools.partial(operator.contains, got, after), 5,
                 "the event after the connection closed")
    writer.close()
    assert writer.due == 0


def test_a_writer_whose_pool_was_disconnected_closes_quietly_and_publishes_anew(
    server: EmbeddedServer, subscribed: tuple[redis.Redis, list[bytes]],
) -> None:
    """kombu closes a channel's pool on its error paths, then the channel: the writer's
    connection is gone under it (this once stopped a worker with an AttributeError)."""
    _, got = subscribed
    client = redis.Redis.from_url(server.url)
    writer = FanoutWriter(client)
    writer.publish(["events"], "one")
    client.connection_pool.disconnect()  # a reply still due on a closed connection
    writer.publish(["events"], "two")
    wait_for(lambda: got == [b"one", b"two"], 5, "both events")
    client.connection_pool.disconnect()
    writer.close()  # does not raise
    assert writer.due == 0
