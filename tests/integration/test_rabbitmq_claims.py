"""RabbitMQ ingest: an idempotency key is ``seen`` only once its event's publish
was confirmed, so a failed or crashed publish can be re-sent and is accepted.

A publish failure is forced in the producer (in process: a broker nack surfaces
as ``BrokerUnavailable``, as kombu raises ``OperationalError`` for it; in a
subprocess: the producer dies mid-chunk). Broker, state Redis and queues are real;
events go to the ``bulk`` tier, which no worker consumes, so they stay queued.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import OperationalError

from pipeline.core.state import Keys
from pipeline.errors import BrokerUnavailable
from pipeline.producer.enqueue import IN_FLIGHT, Enqueuer, unavailable
from tests.integration.rabbit import (
    AMQP_URL,
    delete_queues,
    new_prefix,
    queued_task_ids,
    rabbit_config,
    require_rabbitmq,
)
from tests.integration.support import Stack

pytestmark = pytest.mark.rabbitmq

CHUNK = 6  # events per publish_many call
FAIL_AT = 3  # the publish of this event (0-based) fails


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    require_rabbitmq()
    prefix = new_prefix()
    config = rabbit_config(tmp_path / "pipeline.toml", prefix)
    s = Stack(AMQP_URL, config, tmp_path, env_extra={"PIPELINE_STATE_URL": redis_url})
    try:
        yield s
    finally:
        delete_queues(prefix)


def _events(n: int) -> list[dict[str, Any]]:
    run = uuid.uuid4().hex[:8]
    return [{"type": "demo.ok", "source": "batch-claims", "id": str(uuid.uuid4()),
             "idempotency_key": f"claims-{run}-{i}"} for i in range(n)]


def _seen(stack: Stack, event: dict[str, Any]) -> bytes | None:
    value = stack.state.get(Keys.seen(event["idempotency_key"], event["source"]))
    return value if isinstance(value, bytes) else None


def _assert_seen_only_if_queued(stack: Stack, events: list[dict[str, Any]],
                                results: list[Any] | None = None) -> set[str]:
    """Every event marked ``seen`` has its task on the tier queue; returns queued ids."""
    queued = set(queued_task_ids(stack.rt.settings.queue_for("bulk")))
    from pipeline.messages.taskids import event_task_id

    for event in events:
        if _seen(stack, event) == b"1":
            assert event_task_id(event, "demo.ok", "source") in queued, event
    return queued


def test_rabbitmq_nacked_publish_mid_chunk_leaves_the_rest_free_to_resend(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    events = _events(CHUNK)
    real_send = Enqueuer.send
    calls = 0

    def nack_at_fail_at(self: Enqueuer, specs: Any) -> None:
        nonlocal calls
        calls += 1
        being_sent = events[calls - 1]
        assert (_seen(stack, being_sent) or b"").startswith(b"pending:")  # not seen yet
        if calls == FAIL_AT + 1:
            raise unavailable(AMQP_URL, OperationalError("message nacked"))
        real_send(self, specs)

    monkeypatch.setattr(Enqueuer, "send", nack_at_fail_at)
    with pytest.raises(BrokerUnavailable):
        stack.rt.publisher.publish_many(events)
    monkeypatch.setattr(Enqueuer, "send", real_send)

    assert [_seen(stack, e) for e in events] == [b"1"] * FAIL_AT + [None] * (CHUNK - FAIL_AT)
    assert len(_assert_seen_only_if_queued(stack, events)) == FAIL_AT

    retried = stack.rt.publisher.publish_many(events)  # the client's retry of the chunk
    assert [r.outcome for r in retried] == ["duplicate"] * FAIL_AT + ["accepted"] * (
        CHUNK - FAIL_AT)
    assert [_seen(stack, e) for e in events] == [b"1"] * CHUNK
    assert len(_assert_seen_only_if_queued(stack, events)) == CHUNK


# Run in a subprocess: publish a chunk and die (os._exit) before the FAIL_AT-th publish.
_CRASHING_PRODUCER = """
import os, sys
from pipeline.producer import enqueue
from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.worker.runtime import runtime_for
import orjson

enqueue.PENDING_CLAIM_TTL_S = {ttl}
real_send, calls = enqueue.Enqueuer.send, [0]
def send(self, specs):
    calls[0] += 1
    if calls[0] == {fail_at} + 1:
        os._exit(9)
    real_send(self, specs)
enqueue.Enqueuer.send = send
settings = load_settings({config!r}, broker_url={url!r}, state_url={state!r})
rt = runtime_for(create_app(settings, main="crashing-producer"))
rt.publisher.publish_many(orjson.loads(sys.stdin.buffer.read()))
"""


def test_rabbitmq_producer_crash_mid_chunk_frees_unconfirmed_keys_after_pending_ttl(
        stack: Stack, redis_url: str) -> None:
    import orjson

    pending_ttl_s = 2
    events = _events(CHUNK)
    script = _CRASHING_PRODUCER.format(ttl=pending_ttl_s, fail_at=FAIL_AT,
                                       config=str(stack.config_path), url=AMQP_URL,
                                       state=redis_url)
    done = subprocess.run([sys.executable, "-c", script], input=orjson.dumps(events),
                          capture_output=True, timeout=60)
    assert done.returncode == 9, done.stderr.decode()[-2000:]

    seen = [_seen(stack, e) for e in events]
    assert seen[:FAIL_AT] == [b"1"] * FAIL_AT
    assert all(v is not None and v.startswith(b"pending:") for v in seen[FAIL_AT:]), seen
    assert len(_assert_seen_only_if_queued(stack, events)) == FAIL_AT

    # While the dead producer's claims are pending, a retry is told to come back later.
    early = stack.rt.publisher.publish_many(events)
    assert [r.outcome for r in early] == ["duplicate"] * FAIL_AT + ["rejected"] * (
        CHUNK - FAIL_AT)
    assert {r.reason for r in early[FAIL_AT:]} == {IN_FLIGHT}

    time.sleep(pending_ttl_s + 0.5)  # the pending claims expire
    late = stack.rt.publisher.publish_many(events)
    assert [r.outcome for r in late] == ["duplicate"] * FAIL_AT + ["accepted"] * (
        CHUNK - FAIL_AT)
    assert len(_assert_seen_only_if_queued(stack, events)) == CHUNK
