"""The Celery task state of a delivery tells how its try settled; it changes nothing else.

When a pipeline task ends, the settle step (:mod:`pipeline.worker.settle`) has already
written the try's outcome durably. What the task then returns or raises only sets
the state Celery reports in its task events (so Flower's Tasks page and API), to
``task_postrun``/``task_failure`` receivers and to a result backend:

=============================================  =======  ==========================
settled as                                     state    exception / result
=============================================  =======  ==========================
success, fan-out                               SUCCESS  ``'succeeded'``, ``'fanned_out'``
a duplicate delivery, not run again            SUCCESS  ``'already_done'``, ``'already_settled'``
a retry scheduled (the attempt failed)         RETRY    :class:`RetryScheduled`
a deferral (breaker, budget, ``RetryAfter``),  RETRY    :class:`Deferred`
  or a recheck of a try running elsewhere
dead-lettered                                  FAILURE  :class:`DeadLettered`
a batch with any event dead-lettered           FAILURE  :class:`BatchDeadLettered`
any other batch                                SUCCESS  ``'batch:succeeded=98;...'``
=============================================  =======  ==========================

Raising ``celery.exceptions.Retry`` ourselves (never ``task.retry()``) publishes
nothing; with ``acks_late`` the worker acknowledges the message (celery
``worker/request.py``: ``on_retry``). Raising any other exception acknowledges it
when ``acks_on_failure`` is true, which :class:`~pipeline.worker.task.PipelineTask`
pins. The next try is the schedule's message, under the same task id, so Flower
shows the task RETRY until that try runs.

A batch message is a carrier: its events that fail are retried as ``pipeline.handle``
tasks of their own (which then show RETRY and FAILURE themselves), so the batch is
FAILURE only when one of its events was dead-lettered right there (say an invalid
payload on its first attempt): the only place Flower can see that one.

A duplicate stays SUCCESS: Celery's ``Ignore`` sends no task event at all, so
Flower would show the task STARTED for ever; its result names the skip.

Every exception here pickles to itself (the pool child sends it to the worker's
main process) and carries ``result``, the outcome string the metrics label
(:func:`pipeline.observe.metrics.task_outcome`).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # untyped
from celery.exceptions import Retry
from celery.worker.request import Request

from pipeline.errors import PipelineError

__all__ = ["BatchDeadLettered", "DeadLettered", "Deferred", "MaskedFailure", "RetryScheduled",
           "TaskRequest", "Verdict", "masked_cause", "raise_for", "settled_result"]


def _at(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


class Verdict(PipelineError):
    """A settled try that did not succeed, as Celery's task state shows it."""

    def __init__(self, text: str, result: str, due_at: float | None = None) -> None:
        super().__init__(text)
        self.result = result  # the settled outcome's string (what the metrics label)
        self.due_at = due_at  # when the next try is due (RETRY states), Unix time

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.result, self.due_at)


class RetryScheduled(Verdict):
    """The attempt failed; its next attempt is in the retry schedule (state RETRY)."""

    @classmethod
    def of(cls, *, attempt: int, max_attempts: int, exception: str, message: str,
           due_at: float, now: float) -> RetryScheduled:
        return cls(f"attempt {attempt} of {max_attempts} failed: {exception}: {message}; "
                   f"attempt {attempt + 1} due at {_at(due_at)} (in {due_at - now:.2f}s)",
                   "retry_scheduled", due_at)


class Deferred(Verdict):
    """The attempt did not run and runs again later, using no attempt (state RETRY)."""

    @classmethod
    def of(cls, *, why: str, attempt: int, due_at: float, now: float,
           result: str | None = None) -> Deferred:
        return cls(f"deferred ({why}): attempt {attempt} runs again at {_at(due_at)} "
                   f"(in {due_at - now:.2f}s), no attempt used", result or f"deferred:{why}",
                   due_at)


class DeadLettered(Verdict):
    """The work is in the dead-letter queue (state FAILURE)."""

    @classmethod
    def of(cls, *, reason: str, attempt: int, exception: str, message: str,
           record_id: str) -> DeadLettered:
        return cls(f"dead-lettered ({reason}) after attempt {attempt}: {exception}: "
                   f"{message} [DLQ record {record_id}]", f"dead_lettered:{reason}")


class BatchDeadLettered(Verdict):
    """Some events of a batch message are in the dead-letter queue (state FAILURE);
    ``result`` holds the per-event counts of :func:`pipeline.worker.batch.run_batch`."""


class MaskedFailure(PipelineError):
    """Stands in for a handler's exception whose text quoted payload values that
    ``redact_paths`` masks: its message is that exception's traceback, masked. Celery
    formats the traceback it sends to Flower (and logs) from the verdict's cause, so
    this is what those show; the DLQ record keeps the original."""


def masked_cause(exc: BaseException | None,
                 mask: Callable[[str], str]) -> BaseException | None:
    """``exc`` itself when ``mask`` changes nothing in its formatted traceback (its
    chain included), else a :class:`MaskedFailure` holding that traceback masked."""
    if exc is None:
        return None
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    shown = mask(text)
    return exc if shown == text else MaskedFailure(f"masked traceback:\n{shown.rstrip()}")


def raise_for(verdict: Verdict) -> NoReturn:
    """Raise what gives ``verdict`` its Celery state: ``Retry`` (RETRY, due at the
    next try) or the verdict itself (FAILURE), chained to the error that caused it."""
    if verdict.due_at is not None:
        when = datetime.fromtimestamp(verdict.due_at, UTC)
        raise Retry(exc=verdict, when=when) from verdict
    raise verdict from verdict.__cause__


def settled_result(retval: object) -> object:
    """What a pipeline task settled, from what it returned or raised (``Retry``
    unwrapped): the outcome string for one of ours, else ``retval`` itself."""
    if isinstance(retval, Retry):
        retval = retval.exc
    return retval.result if isinstance(retval, Verdict) else retval


class TaskRequest(Request):
    """Celery's request, whose ``task-retried`` event names the verdict on every pool.

    Celery sends ``repr(exc_info.exception.exc)``. A prefork child's exception info
    reaches the main process pickled, which unwraps billiard's
    ``ExceptionWithTraceback`` back into the ``Retry`` raised, so ``.exc`` is the
    verdict. Under ``threads`` and ``gevent`` the info is passed as it is, still
    wrapped: ``.exc`` was the ``Retry`` itself, and Flower showed
    ``Retry(Retry(...), RetryScheduled('attempt 1 ...`` cut short by ``safe_repr``.
    Unwrapped here as pickling does (``on_failure`` already unwraps)."""

    def on_retry(self, exc_info: Any) -> None:
        if isinstance(exc_info.exception, ExceptionWithTraceback):
            exc_info.exception = exc_info.exception.exc
        super().on_retry(exc_info)
