"""The RabbitMQ path end to end: quorum queues, retries from the Redis schedule, the DLQ.

Uses the machine's RabbitMQ (``PIPELINE_TEST_AMQP_URL``, default
``amqp://guest:guest@127.0.0.1:5672//``) with queue names of this run's own,
deleted afterwards. Skipped when RabbitMQ is unreachable, except under ``CI``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection

from pipeline.retry import Reason
from tests.integration.support import Stack, write_config

AMQP_URL = os.environ.get("PIPELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

pytestmark = pytest.mark.rabbitmq


def _reachable() -> bool:
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not _reachable():
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ unreachable at {AMQP_URL} under CI")
        pytest.skip(f"RabbitMQ unreachable at {AMQP_URL}")
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    tmp = tmp_path_factory.mktemp("rabbit")
    config = write_config(tmp / "pipeline.toml", prefix=prefix)
    # dead_letter_queue is a top-level key: it must come before the first table.
    config.write_text(f'dead_letter_queue = "{prefix}dead_letter"\n' + config.read_text())
    s = Stack(AMQP_URL, config, tmp, env_extra={"PIPELINE_STATE_URL": redis_url})
    try:
        s.start_worker("standard")
        yield s
    finally:
        s.stop()
        with Connection(AMQP_URL) as conn:
            channel = conn.channel()
            for name in ("critical", "standard", "bulk", "dead_letter"):
                try:
                    channel.queue_delete(f"{prefix}{name}")
                except Exception:
                    channel = conn.channel()


def test_rabbitmq_tier_queues_are_quorum_queues(stack: Stack) -> None:
    queue = stack.rt.settings.queue_for("standard")
    assert f"{queue}" in stack.workers[0].log()
    with Connection(AMQP_URL) as conn:
        # Redeclaring as classic must fail if the broker holds it as a quorum queue.
        channel = conn.channel()
        with pytest.raises(Exception, match="x-queue-type"):
            channel.queue_declare(queue, durable=True, auto_delete=False, passive=False,
                                  arguments={"x-queue-type": "classic"})


def test_rabbitmq_event_is_processed(stack: Stack) -> None:
    result = stack.publish("demo.ok")
    stack.wait_effect(result.id)
    assert stack.effects(result.id) == 1


def test_rabbitmq_failing_event_retries_then_lands_in_dlq(stack: Stack) -> None:
    result = stack.publish("demo.fail")
    record = stack.wait_dlq(result.id, timeout_s=30)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 3
    assert "DemoTransientError" in record.traceback
    # Reading the DLQ is not destructive: the record is still there.
    assert stack.dlq_for(result.id)


def test_rabbitmq_handler_delay_goes_through_the_retry_schedule(stack: Stack) -> None:
    result = stack.publish("demo.retry_after", payload={"delay_s": 0.5, "fail_times": 2})
    stack.wait_effect(result.id, timeout_s=20)
    assert stack.effects(result.id) == 1


def test_rabbitmq_dlq_replay_republishes_then_acks(stack: Stack) -> None:
    from pipeline.demo import fixed_key
    from pipeline.replay import Replayer
    from pipeline.triage import RecordFilter

    result = stack.publish("demo.fail")
    assert result.id is not None
    stack.wait_dlq(result.id, timeout_s=30)
    stack.state.set(fixed_key("demo.fail"), "1")
    try:
        summary = Replayer(stack.rt).replay(RecordFilter(ids=frozenset({result.id})), by="t")
        assert summary.replayed == 1
        stack.wait_effect(result.id, timeout_s=20)
        assert stack.dlq_for(result.id) == []
    finally:
        stack.state.delete(fixed_key("demo.fail"))
