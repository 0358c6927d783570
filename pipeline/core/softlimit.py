"""Where a prefork soft time limit may interrupt an attempt: in its handler, nowhere else.

Celery's prefork pool enforces ``soft_time_limit`` by sending the child ``SIGUSR1``,
whose handler (billiard's) raises ``SoftTimeLimitExceeded`` wherever the child is at
that moment: in the handler, as meant, but just as well in the pipeline's own begin
and settle (a settle cut in half is requeued, the redelivery finds a running mark and
counts a lost attempt), or inside an async handler's event loop, in the middle of the
loop's machinery or of the coroutine's own cleanup after a cancellation.

So the worker hands billiard this module's handler to install in each child in
place of its own, and the handler acts on what the child is doing when the limit
passes:

* in a synchronous handler (:func:`interruptible` with :func:`raise_soft_limit`):
  ``SoftTimeLimitExceeded`` is raised there, as Celery does;
* in an async handler (:func:`interruptible` with a callback of
  :mod:`pipeline.core.eventloop`): its deadline is expired at once, so the coroutine
  is *cancelled* at its await point, runs its cleanup, and the attempt fails with
  ``SoftTimeLimitExceeded`` exactly as at its own ``soft_time_limit_s``;
* anywhere else in a pipeline task (begin, checks, settle, between a batch's
  events): the limit is remembered and raised at the start of the task's next
  handler, if it starts one; after the last, it is dropped: the settle runs whole,
  bounded by the hard limit;
* in any other task of the app (an attached app's own): raised where it is, as
  billiard does;
* between tasks (a late signal for a task that has just finished): ignored, where
  billiard's would raise in the pool's loop and end the child.

The limit is raised once per task, like Celery's. Threads and gevent pools send no
such signal (a prefork-only feature), so there every ``interruptible`` block is inert.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import billiard.pool
from billiard.exceptions import SoftTimeLimitExceeded
from celery import signals

from pipeline.core.names import BATCH_TASK_NAME, TASK_NAME

__all__ = ["install", "interruptible", "raise_soft_limit"]

SIG_SOFT_TIMEOUT = getattr(signal, "SIGUSR1", None)  # billiard's soft-limit signal
PIPELINE_TASKS = frozenset({TASK_NAME, BATCH_TASK_NAME})  # tasks whose handlers we bound


class _Limit(threading.local):  # the prefork child's main thread is the one that counts
    """The child's soft limit: the task running, what the signal does now, whether it
    passed unraised."""

    task: str | None = None  # "pipeline", "other", or None between tasks
    on_limit: Callable[[], None] | None = None  # set inside a handler
    passed = False  # the task's limit passed outside a handler; raised at the next one


_limit = _Limit()
_installed = False


def raise_soft_limit() -> None:
    """A synchronous handler's reaction: ``SoftTimeLimitExceeded`` where it is."""
    raise SoftTimeLimitExceeded()


class interruptible:  # noqa: N801 - used as a function: ``with interruptible():``
    """The block a soft limit may interrupt (a handler), through ``on_limit``. A limit
    that passed earlier in the task is raised on entry. (A class, not a generator: a
    batch enters one per event.)"""

    __slots__ = ("_on_limit", "_previous")

    def __init__(self, on_limit: Callable[[], None] = raise_soft_limit) -> None:
        self._on_limit = on_limit

    def __enter__(self) -> None:
        if _limit.passed:
            _limit.passed = False
            raise SoftTimeLimitExceeded(
                "the soft time limit passed before the handler started")
        self._previous, _limit.on_limit = _limit.on_limit, self._on_limit

    def __exit__(self, *_: object) -> None:
        if _limit.on_limit is self._on_limit:  # not fired: the enclosing block's again
            _limit.on_limit = self._previous


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _limit.task == "other":
        raise SoftTimeLimitExceeded()  # not ours: billiard's behaviour
    if _limit.task is None:
        return  # late, the task is over
    on_limit, _limit.on_limit = _limit.on_limit, None  # once per task
    if on_limit is None:
        _limit.passed = True
    else:
        on_limit()


def _task_started(sender: Any = None, **_: Any) -> None:
    """``task_prerun``: a new task; the previous one's limit is forgotten."""
    _limit.task = "pipeline" if getattr(sender, "name", None) in PIPELINE_TASKS else "other"
    _limit.passed = False
    _limit.on_limit = None


def _task_ended(**_: Any) -> None:
    """``task_postrun``: between tasks, a late signal is ignored."""
    _limit.task = None
    _limit.passed = False
    _limit.on_limit = None


def install() -> None:
    """Have every prefork child this process forks handle soft limits here (billiard
    installs ``billiard.pool.soft_timeout_sighandler`` after the process initializer,
    so the name is what is replaced), and follow the tasks it runs."""
    global _installed
    if _installed:
        return
    billiard.pool.soft_timeout_sighandler = _on_signal
    signals.task_prerun.connect(_task_started, weak=False)
    signals.task_postrun.connect(_task_ended, weak=False)
    _installed = True
