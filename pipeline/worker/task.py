"""The one Celery task, ``pipeline.handle``: run one handler for one event, once.

Every delivery goes through :class:`~pipeline.worker.attempt.Attempt`: begin, checks, the
handler, then one atomic, idempotent settle keyed by (task id, try). Only after the
settle does Celery acknowledge the message (``acks_late``). Hard time limits
included: ``acks_on_timeout = False``, so Celery requeues the message instead of
acknowledging it before the task's ``on_failure`` has settled the try; the
redelivery finds the try settled and is acknowledged without running. If a settle
cannot reach the state store (after retries), the message is rejected for
redelivery rather than acknowledged.

After a settle the task returns (SUCCESS) or raises what gives Celery's task state
the settled outcome (RETRY, FAILURE: :mod:`pipeline.worker.taskstate`); either way the
message is acknowledged (``acks_on_failure`` is pinned true) and nothing is
re-published.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis
from celery import Task
from celery.exceptions import Reject, TimeLimitExceeded

from pipeline.core.handlers import registry
from pipeline.worker.attempt import Attempt
from pipeline.worker.runtime import runtime_for
from pipeline.worker.statewatch import report_state_failure
from pipeline.worker.taskstate import BatchDeadLettered, DeadLettered, TaskRequest, raise_for

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TASK_NAME", "PipelineTask", "register_task", "settle_or_requeue", "timeout_settled"]

TASK_NAME = "pipeline.handle"
log = logging.getLogger(__name__)


class PipelineTask(Task):  # type: ignore[type-arg]
    """Base class: late acks, requeue when the worker child is lost or timed out, JSON."""

    acks_late = True
    acks_on_failure = True  # a dead letter raised for its FAILURE state is settled: ack it
    acks_on_timeout = False  # requeue: on_failure settles; the redelivery only acks
    reject_on_worker_lost = True
    ignore_result = True
    serializer = "json"
    typing = False  # kwargs are validated by the envelope, not by signature binding
    # expected: Celery logs them at INFO without a traceback (the attempt logged it)
    throws = (DeadLettered, BatchDeadLettered)
    # task-retried names the verdict under threads and gevent too (a class: Celery
    # takes one as well as the dotted name its stubs type the attribute as)
    Request = TaskRequest  # type: ignore[assignment]

    def attempts(self, task_id: str, args: Any, kwargs: Any) -> list[Attempt]:
        """The tries one message carries (one; a batch overrides)."""
        return [Attempt(runtime_for(self.app), task_id, dict(args[0]), dict(kwargs))]

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        """Hard time limit: the child was killed. Settle, from the worker's main
        process, the try that was running as a failed attempt; the tries of the
        message that never began run on its redelivery."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        _timeouts_settled.pop(task_id, None)
        try:
            for attempt in self.attempts(task_id, args, kwargs):
                attempt.only_if_running = True  # settled or never begun: left alone
                entry = registry.get(attempt.handler)
                if entry is not None:  # its calls count as failed if this settle writes
                    attempt.records = [(downstream, False) for downstream in entry.downstreams]
                attempt.failed(exc)
            _timeouts_settled[task_id] = True
            while len(_timeouts_settled) > TIMEOUTS_REMEMBERED:  # nobody read the oldest
                _timeouts_settled.popitem(last=False)
        except Exception:
            log.exception("could not settle task %s after its hard time limit; its "
                          "redelivery settles it as lost", task_id, extra={"task_id": task_id})


TIMEOUTS_REMEMBERED = 1000  # hard time limits whose settle outcome is kept for metrics
# task id -> its try settled after a hard time limit; by task, not on the shared task
# object: under gevent several greenlets time out at once.
_timeouts_settled: OrderedDict[str, bool] = OrderedDict()


def timeout_settled(task_id: str) -> bool:
    """Whether ``on_failure`` settled ``task_id``'s try after its hard time limit (read
    once, by the ``task_failure`` receiver that follows it)."""
    return _timeouts_settled.pop(task_id, False)


def register_task(app: Celery) -> Any:
    """Register ``pipeline.handle`` on ``app``."""

    @app.task(name=TASK_NAME, bind=True, base=PipelineTask, shared=False)
    def handle(self: PipelineTask, /, event: dict[str, Any], **kwargs: Any) -> str:
        (attempt,) = self.attempts(str(self.request.id), [event], kwargs)
        result = settle_or_requeue(str(self.request.id), attempt.run, self.app)
        if attempt.verdict is not None:  # settled, and not as a success: say so
            raise_for(attempt.verdict)
        return result

    return handle


def settle_or_requeue(task_id: str, run: Callable[[], str], app: Celery | None = None) -> str:
    """``run()``; if the broker or state store fails while the work is being settled,
    reject the message for redelivery instead of letting Celery acknowledge it (after
    telling the worker to stop consuming until the state store answers)."""
    try:
        return run()
    except (Reject, TimeLimitExceeded):
        raise
    except Exception as exc:
        log.exception("could not settle task %s; requeueing", task_id)
        if app is not None and isinstance(exc, redis.RedisError | OSError):
            report_state_failure(app)
        raise Reject(exc, requeue=True) from exc
