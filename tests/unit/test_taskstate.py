"""Celery task states of settled tries, through Celery's own tracer and worker request.

A pipeline task raises ``Retry`` (RETRY) or a dead letter (FAILURE) only after the
settle step wrote the outcome: the message must be acknowledged either way, never
rejected, requeued or re-published. These tests run the real code path of a prefork
worker (the tracer in the "child", its result pickled, ``Request.on_success`` in the
"main process") with a mock message, and read the acknowledgement and the task events.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from datetime import datetime
from typing import Any, cast
from unittest.mock import Mock

import pytest
from celery import Celery
from celery.app.trace import trace_task_ret
from celery.contrib.testing.mocks import TaskMessage
from celery.exceptions import Retry
from celery.worker.request import Request

from pipeline.worker.batch import batch_outcomes, batch_verdict
from pipeline.worker.task import PipelineTask
from pipeline.worker.taskstate import (
    BatchDeadLettered,
    DeadLettered,
    Deferred,
    MaskedFailure,
    RetryScheduled,
    Verdict,
    masked_cause,
    raise_for,
    settled_result,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def app() -> Iterator[Celery]:
    app = Celery("taskstate-test", broker="memory://", set_as_current=False)
    # a team's app may say "do not ack failures": the pipeline's tasks ack settled ones
    app.conf.task_acks_on_failure = False
    app.conf.task_ignore_result = True

    @app.task(name="test.settles", bind=True, base=PipelineTask, shared=False)
    def settles(self: PipelineTask, verdict: str) -> str:
        if verdict in VERDICTS:
            raise_for(VERDICTS[verdict]())
        return verdict

    yield app
    app.close()


def failed_attempt() -> RetryScheduled:
    verdict = RetryScheduled.of(attempt=1, max_attempts=3, exception="ValueError",
                                message="boom", due_at=NOW + 1.5, now=NOW)
    verdict.__cause__ = ValueError("boom")
    return verdict


VERDICTS: dict[str, Any] = {
    "retry": failed_attempt,
    "defer": lambda: Deferred.of(why="breaker_open:payments-api", attempt=2,
                                 due_at=NOW + 30, now=NOW),
    "dead": lambda: DeadLettered.of(reason="permanent_error", attempt=1,
                                    exception="pipeline.errors.PermanentError",
                                    message="card declined", record_id="r-1"),
    "batch": lambda: BatchDeadLettered("1 of 3 events dead-lettered",
                                       "batch:succeeded=2;dead_lettered:no_handler=1"),
}


def deliver(app: Celery, argument: str) -> tuple[Mock, Mock, dict[str, dict[str, Any]]]:
    """Run ``test.settles(argument)`` as a prefork worker does: (on_ack, on_reject,
    task events by type)."""
    task = app.tasks["test.settles"]
    message = TaskMessage(task.name, args=[argument])
    on_ack, on_reject = Mock(), Mock()
    eventer = Mock(enabled=True)
    request = Request(message, app=app, task=task, on_ack=on_ack, on_reject=on_reject,
                      eventer=eventer, hostname="test@host")
    returned = trace_task_ret(task.name, request.id, message.headers, message.body,
                              message.content_type, message.content_encoding, app=app)
    request.on_success(pickle.loads(pickle.dumps(returned)))  # the pool's pipe
    events = {c.args[0]: c.kwargs for c in eventer.send.call_args_list}
    return on_ack, on_reject, events


def test_a_scheduled_retry_is_acknowledged_and_reported_retried_with_its_due_time(
    app: Celery,
) -> None:
    on_ack, on_reject, events = deliver(app, "retry")
    assert on_ack.call_count == 1
    assert on_reject.call_count == 0
    retried = events["task-retried"]
    assert retried["exception"].startswith("RetryScheduled('attempt 1 of 3 failed: "
                                           "ValueError: boom; attempt 2 due at 2027-01-15T08:")
    assert "(in 1.50s)" in retried["exception"]
    assert "ValueError: boom" in retried["traceback"]  # the handler's error, chained
    assert "task-failed" not in events


def test_a_deferral_is_acknowledged_and_reported_retried_with_its_reason(app: Celery) -> None:
    on_ack, on_reject, events = deliver(app, "defer")
    assert (on_ack.call_count, on_reject.call_count) == (1, 0)
    assert "deferred (breaker_open:payments-api)" in events["task-retried"]["exception"]


@pytest.mark.parametrize("argument", ["dead", "batch"])
def test_a_dead_letter_is_acknowledged_even_where_the_app_keeps_failures(
    app: Celery, argument: str,
) -> None:
    on_ack, on_reject, events = deliver(app, argument)
    assert (on_ack.call_count, on_reject.call_count) == (1, 0)
    assert "task-failed" in events
    assert "task-retried" not in events


def test_a_dead_letter_event_names_reason_exception_message_and_record(app: Celery) -> None:
    _, _, events = deliver(app, "dead")
    assert events["task-failed"]["exception"] == (
        "DeadLettered('dead-lettered (permanent_error) after attempt 1: "
        "pipeline.errors.PermanentError: card declined [DLQ record r-1]')")


def test_a_duplicate_delivery_succeeds_with_a_result_naming_the_skip(app: Celery) -> None:
    on_ack, _, events = deliver(app, "already_done")
    assert on_ack.call_count == 1
    assert events["task-succeeded"]["result"] == "'already_done'"


def test_the_pipeline_task_pins_acknowledging_failures() -> None:
    assert PipelineTask.acks_late is True
    assert PipelineTask.acks_on_failure is True
    assert PipelineTask.reject_on_worker_lost is True
    assert PipelineTask.acks_on_timeout is False


@pytest.mark.parametrize("make", list(VERDICTS.values()))
def test_every_verdict_pickles_to_itself(make: Any) -> None:
    verdict: Verdict = make()
    copy = pickle.loads(pickle.dumps(verdict))
    assert (type(copy), str(copy), copy.result, copy.due_at) == (
        type(verdict), str(verdict), verdict.result, verdict.due_at)


def test_a_retry_is_raised_as_celery_retry_due_when_the_next_try_is() -> None:
    verdict = failed_attempt()
    with pytest.raises(Retry) as raised:
        raise_for(verdict)
    assert raised.value.exc is verdict
    assert raised.value.when is not None
    assert cast(datetime, raised.value.when).timestamp() == NOW + 1.5
    assert settled_result(raised.value) == "retry_scheduled"


def test_a_dead_letter_is_raised_itself_chained_to_the_handlers_error() -> None:
    verdict = DeadLettered.of(reason="retries_exhausted", attempt=3, exception="ValueError",
                              message="boom", record_id="r")
    cause = ValueError("boom")
    verdict.__cause__ = cause
    with pytest.raises(DeadLettered) as raised:
        raise_for(verdict)
    assert raised.value.__cause__ is cause
    assert settled_result(raised.value) == "dead_lettered:retries_exhausted"


def test_a_batch_fails_only_when_one_of_its_events_was_dead_lettered() -> None:
    assert batch_verdict("batch:succeeded=8;retry_scheduled=1;deferred:requested=1") is None
    verdict = batch_verdict("batch:succeeded=7;dead_lettered:invalid_payload=2;"
                            "dead_lettered:no_handler=1")
    assert verdict is not None
    assert str(verdict).startswith(
        "3 of 10 events dead-lettered (invalid_payload=2, no_handler=1)")
    settled = settled_result(verdict)
    assert isinstance(settled, str)
    assert batch_outcomes(settled)[0] == ("succeeded", 7)  # the metrics count every event


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_a_cause_quoting_a_masked_value_is_replaced_by_its_masked_traceback() -> None:
    cause = _raised(ValueError("bad card 4111111111111111"))
    shown = masked_cause(cause, lambda text: text.replace("4111111111111111", "[redacted]"))
    assert isinstance(shown, MaskedFailure)
    assert "ValueError: bad card [redacted]" in str(shown)
    assert "4111" not in str(shown)
    assert "Traceback (most recent call last)" in str(shown)


def test_a_cause_with_nothing_to_mask_is_kept_as_raised() -> None:
    cause = _raised(ValueError("downstream is down"))
    assert masked_cause(cause, lambda text: text.replace("4111111111111111", "x")) is cause
    assert masked_cause(None, str) is None
