"""The RabbitMQ path end to end: quorum queues, retries from the Redis schedule, the DLQ.

Uses the machine's RabbitMQ (``PIPELINE_TEST_AMQP_URL``, default
``amqp://guest:guest@127.0.0.1:5672//``) with queue names of this run's own,
deleted afterwards. Skipped when RabbitMQ is unreachable, except under ``CI``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from kombu import Connection

from pipeline.core.retry import Reason
from pipeline.dlq.dlx import DELIVERY_LIMIT_EXCEPTION, delivery_limit
from tests.integration.rabbit import (
    AMQP_URL,
    delete_queues,
    new_prefix,
    queued_task_ids,
    rabbit_config,
    require_rabbitmq,
)
from tests.integration.support import Stack, wait_for

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_rabbitmq()
    prefix = new_prefix()
    tmp = tmp_path_factory.mktemp("rabbit")
    config = rabbit_config(tmp / "pipeline.toml", prefix)
    s = Stack(AMQP_URL, config, tmp, env_extra={"PIPELINE_STATE_URL": redis_url})
    try:
        # a node name of this run's own: its pidbox queue is exclusive on a shared broker
        s.start_worker("standard", "--hostname", f"{prefix}standard@%h")
        yield s
    finally:
        s.stop()
        delete_queues(prefix)


def test_rabbitmq_tier_queues_are_quorum_queues_with_our_delivery_limit(stack: Stack) -> None:
    queue = stack.rt.settings.queue_for("standard")
    assert f"{queue}" in stack.workers[0].log()
    with Connection(AMQP_URL) as conn:
        # Redeclaring with other arguments must fail if the broker holds it as ours.
        for arguments in ({"x-queue-type": "classic"}, {"x-queue-type": "quorum"},
                          {"x-queue-type": "quorum", "x-delivery-limit": 20}):
            channel: Any = conn.channel()  # py-amqp's Channel, untyped
            with pytest.raises(Exception, match="PRECONDITION_FAILED"):
                channel.queue_declare(queue, durable=True, auto_delete=False, passive=False,
                                      arguments=arguments)


def test_rabbitmq_worker_starts_without_native_delayed_delivery(stack: Stack) -> None:
    """The pipeline sends no countdown/ETA messages: Celery's native delayed delivery,
    which the quorum tier queues would switch on, is left out (pipeline.worker.consumer)."""
    log = stack.workers[0].log()
    assert "ready." in log
    assert "delayed delivery" not in log.lower()
    assert "Direct exchanges" not in log


def test_rabbitmq_event_is_processed(stack: Stack) -> None:
    result = stack.publish("demo.ok")
    assert result.id is not None
    stack.wait_effect(result.id)
    assert stack.effects(result.id) == 1


def test_rabbitmq_failing_event_retries_then_lands_in_dlq(stack: Stack) -> None:
    result = stack.publish("demo.fail")
    assert result.id is not None
    record = stack.wait_dlq(result.id, timeout_s=30)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 3
    assert "DemoTransientError" in record.traceback
    # Reading the DLQ is not destructive: the record is still there.
    assert stack.dlq_for(result.id)


def test_rabbitmq_handler_delay_goes_through_the_retry_schedule(stack: Stack) -> None:
    result = stack.publish("demo.retry_after", payload={"delay_s": 0.5, "fail_times": 2})
    assert result.id is not None
    stack.wait_effect(result.id, timeout_s=20)
    assert stack.effects(result.id) == 1


def test_rabbitmq_dlq_replay_republishes_then_acks(stack: Stack) -> None:
    from pipeline.demo import fixed_key
    from pipeline.dlq.replay import Replayer
    from pipeline.dlq.triage import RecordFilter

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


def test_rabbitmq_crash_loop_is_dead_lettered_by_the_pipelines_own_count_first(
        stack: Stack) -> None:
    result = stack.publish("demo.crash")  # os._exit in the worker child, every delivery
    assert result.id is not None
    record = stack.wait_dlq(result.id, timeout_s=60)
    assert record.reason is Reason.MAX_DELIVERIES
    assert record.exception == "WorkerLost"  # ours, well inside the broker's margin
    assert len(stack.dlq_for(result.id)) == 1


def test_rabbitmq_past_the_delivery_limit_lands_in_the_dlq_with_its_context(
        stack: Stack) -> None:
    """The broker backstop: nothing counts deliveries (no worker, no state store
    involved), a consumer keeps rejecting, RabbitMQ dead-letters into our DLQ."""
    stack.rt.dlq.declare()  # as every tier worker does at start
    result = stack.publish("demo.crash", source="batch-dlx")  # bulk: no worker consumes it
    assert result.id is not None
    assert result.tier == "bulk"
    queue = stack.rt.settings.queue_for("bulk")
    deliveries = 0
    with Connection(AMQP_URL) as conn:
        channel: Any = conn.channel()  # py-amqp's Channel, untyped
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=False)
            if message is None:
                if not stack.dlq_for(result.id):
                    time.sleep(0.05)
                    continue
                break
            deliveries += 1
            channel.basic_reject(message.delivery_tag, requeue=True)
    assert deliveries == delivery_limit(stack.rt.settings.tier("bulk").max_deliveries) + 1
    assert queued_task_ids(queue) == []

    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.MAX_DELIVERIES
    assert record.exception == DELIVERY_LIMIT_EXCEPTION
    assert record.event["id"] == result.id
    assert record.event["type"] == "demo.crash"
    assert (record.handler, record.tier, record.queue) == ("demo.crash", "bulk", queue)
    assert record.task_id == result.task_ids[0]
    assert record.attempts == 1
    assert "delivery_limit" in record.message
    assert "count 1" in record.message

    listed = subprocess.run([sys.executable, "-m", "pipeline", "dlq", "list", "--json",
                             "--reason", "max_deliveries"], capture_output=True, text=True,
                            env=stack.env(), timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert result.id in {r["event"]["id"] for r in orjson.loads(listed.stdout)}
    assert any(s.count and s.exception == DELIVERY_LIMIT_EXCEPTION
               for s in stack.rt.dlq.stats())

    from pipeline.dlq.replay import Replayer
    from pipeline.dlq.triage import RecordFilter

    summary = Replayer(stack.rt).replay(RecordFilter(ids=frozenset({record.id})), by="t")
    assert summary.replayed == 1
    assert stack.dlq_for(result.id) == []
    assert wait_for(lambda: queued_task_ids(queue), 10, "the replayed task") == [record.task_id]
