"""Events through real tier workers on a real broker: routing, retries, the DLQ."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer

from pipeline.core.retry import Reason
from tests.integration.support import SLOW_TIER, Stack, wait_for, write_config


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("flow")
    config = write_config(tmp / "pipeline.toml", extra=SLOW_TIER)
    s = Stack(redis_url, config, tmp)
    try:
        s.start_workers("critical", "standard", "slow")
        yield s
    finally:
        s.stop()


def worker_log(stack: Stack, tier: str) -> str:
    return "".join(w.log() for w in stack.workers if w.tier == tier)


def test_rule_routes_event_to_its_tier_and_only_that_tier_runs_it(stack: Stack) -> None:
    result = stack.publish("demo.ok", source="vip-7")
    assert result.id is not None
    assert result.tier == "critical"
    stack.wait_effect(result.id)
    task_id = result.task_ids[0]
    assert task_id in worker_log(stack, "critical")
    assert task_id not in worker_log(stack, "standard")


def test_explicit_tier_on_event_overrides_rules(stack: Stack) -> None:
    result = stack.publish("demo.ok", source="vip-7", tier="standard")
    assert result.id is not None
    assert result.tier == "standard"
    stack.wait_effect(result.id)
    assert result.task_ids[0] in worker_log(stack, "standard")
    assert result.task_ids[0] not in worker_log(stack, "critical")


def test_worker_consumes_only_its_own_tier_queue(stack: Stack) -> None:
    result = stack.publish("demo.ok", source="batch-1")  # bulk: no bulk worker runs here
    assert result.id is not None
    assert result.tier == "bulk"
    fresh = stack.publish("demo.ok")  # a standard event published after it is processed...
    assert fresh.id is not None
    stack.wait_effect(fresh.id)
    time.sleep(0.5)
    assert stack.effects(result.id) == 0  # ... while the bulk one waits on its own queue
    assert stack.state.llen("bulk") == 1
    stack.state.delete("bulk")


def test_failing_handler_retries_with_backoff_then_lands_in_dlq_with_every_field(
    stack: Stack,
) -> None:
    started = time.time()
    result = stack.publish("demo.fail", payload={"note": "x"})
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 3  # standard: max_retries = 2
    assert record.tier == "standard"
    assert record.queue == "standard"
    assert record.handler == "demo.fail"
    assert record.exception == "pipeline.demo.DemoTransientError"
    assert record.message == "demo.fail always fails (attempt 3)"
    assert "DemoTransientError" in record.traceback
    assert "Traceback" in record.traceback
    assert record.event["id"] == result.id
    assert record.event["payload"] == {"note": "x"}
    assert record.worker
    assert record.task_id == result.task_ids[0]
    uuid.UUID(record.id)
    assert started - 1 < record.first_failed_at.timestamp() <= record.last_failed_at.timestamp()
    assert record.last_failed_at.timestamp() <= time.time()
    assert isinstance(record.first_failed_at, datetime)


def test_permanent_error_goes_straight_to_dlq(stack: Stack) -> None:
    result = stack.publish("demo.invalid")
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.PERMANENT_ERROR
    assert record.attempts == 1
    assert record.exception == "pipeline.errors.PermanentError"


def test_unknown_event_type_is_dead_lettered_as_no_handler(stack: Stack) -> None:
    result = stack.publish("nobody.handles_this")
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.NO_HANDLER
    assert "nobody.handles_this" in record.message


def test_payload_failing_handler_model_is_dead_lettered_as_invalid_payload(stack: Stack) -> None:
    result = stack.publish("demo.typed", payload={"user_id": "not-a-number", "amount": 3})
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.INVALID_PAYLOAD
    assert record.attempts == 1
    assert "user_id" in record.message
    assert stack.effects(result.id) == 0


def test_task_whose_handler_is_not_for_its_event_type_is_dead_lettered_not_run(
        stack: Stack) -> None:
    """As a crafted DLQ record or a task applied from Flower would send it."""
    from pipeline.core.events import Event
    from pipeline.messages.taskids import task_id_for

    event = Event(type="reward.granted", source="crafted", payload={"user_id": 1})
    message = event.to_message()
    spec = stack.rt.messages.spec(message, handler="demo.ok", tier="critical",
                                   task_id=task_id_for(message["id"], "demo.ok"), attempt=1)
    stack.rt.publisher.send([spec])
    record = stack.wait_dlq(message["id"])
    assert record.reason is Reason.INVALID_PAYLOAD
    assert record.handler == "demo.ok"
    assert "'demo.ok'" in record.message
    assert "'reward.granted'" in record.message
    assert stack.effects(message["id"]) == 0


def test_fan_out_failure_of_one_handler_does_not_rerun_the_other(stack: Stack) -> None:
    result = stack.publish("demo.fanout")
    assert result.id is not None
    assert sorted(result.handlers) == ["demo.fanout.fail", "demo.fanout.ok"]
    assert len(set(result.task_ids)) == 2
    record = stack.wait_dlq(result.id)
    assert record.handler == "demo.fanout.fail"
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert stack.effects(f"{result.id}#ok") == 1  # ran once, not once per retry of its sibling


def test_handler_asking_for_a_delay_is_retried_after_it(stack: Stack) -> None:
    started = time.monotonic()
    result = stack.publish("demo.retry_after", payload={"delay_s": 1.0, "fail_times": 1})
    assert result.id is not None
    stack.wait_effect(result.id)
    assert time.monotonic() - started >= 1.0
    assert stack.dlq_for(result.id) == []


def test_soft_time_limit_is_a_retryable_failure(stack: Stack) -> None:
    result = stack.publish("demo.slow", tier="slow", payload={"ms": 2000})
    assert result.id is not None
    record = stack.wait_dlq(result.id)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 2
    assert record.exception.endswith(".SoftTimeLimitExceeded")  # billiard defines it


def test_hard_time_limit_kills_the_attempt_and_counts_as_a_failure(stack: Stack) -> None:
    result = stack.publish("demo.slow", tier="slow",
                           payload={"ms": 4000, "ignore_soft_limit": True})
    assert result.id is not None
    record = stack.wait_dlq(result.id, timeout_s=30)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 2
    assert record.exception.endswith(".TimeLimitExceeded")
    assert stack.effects(result.id) == 0


def test_crash_looping_event_is_dead_lettered_while_its_tier_keeps_flowing(stack: Stack) -> None:
    crash = stack.publish("demo.crash")
    assert crash.id is not None
    others = [stack.publish("demo.ok") for _ in range(20)]
    record = stack.wait_dlq(crash.id, timeout_s=60)
    assert record.reason is Reason.MAX_DELIVERIES
    assert record.handler == "demo.crash"
    assert "2 tries lost so far" in record.message  # standard: max_deliveries = 2
    for event in others:
        assert event.id is not None
        stack.wait_effect(event.id)


def test_pickled_message_is_refused(stack: Stack, tmp_path: Path) -> None:
    marker = str(uuid.uuid4())
    event = {"id": marker, "type": "demo.ok", "source": "evil", "payload": {}}
    with Connection(stack.url) as conn:
        Producer(conn).publish(
            [[event], {"handler": "demo.ok", "tier": "standard", "attempt": 1}, {}],
            exchange=Exchange("standard", "direct"), routing_key="standard",
            serializer="pickle",
            headers={"lang": "py", "task": "pipeline.handle", "id": marker},
        )
    wait_for(lambda: "pickle" in worker_log(stack, "standard"), 10, "the refusal to be logged")
    assert "Refusing to deserialize" in worker_log(stack, "standard")
    time.sleep(0.5)
    assert stack.effects(marker) == 0
