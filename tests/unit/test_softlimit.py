"""A prefork soft time limit (SIGUSR1, sent here for real to this process) interrupts
a handler only: raised in a synchronous one, cancelling an async one, remembered
when it passes outside one."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import billiard.pool
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from pipeline.core import softlimit
from pipeline.core.events import Event
from pipeline.core.handlers import Handler

EVENT = Event(type="t.x", source="tests")


class Task:
    def __init__(self, name: str) -> None:
        self.name = name


HANDLE = Task("pipeline.handle")


@pytest.fixture(autouse=True)
def child_handler() -> Iterator[None]:
    """This process as a prefork child (of a worker that called ``install``) in the
    middle of a ``pipeline.handle`` task."""
    softlimit.install()
    previous = signal.signal(signal.SIGUSR1, billiard.pool.soft_timeout_sighandler)
    softlimit._task_started(sender=HANDLE)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)
        softlimit._task_ended()


def soft_limit() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # what billiard's pool sends its child


def soft_limit_then_wait() -> None:
    soft_limit()
    time.sleep(1)


def make(func: object) -> Handler:
    return Handler(name="t.h", pattern="t.*", func=func)  # type: ignore[arg-type]


def test_the_children_install_this_handler_in_place_of_billiards() -> None:
    assert billiard.pool.soft_timeout_sighandler is softlimit._on_signal
    assert signal.getsignal(signal.SIGUSR1) is softlimit._on_signal


def test_a_soft_limit_in_a_synchronous_handler_is_raised_there() -> None:
    reached: list[str] = []

    def handle(event: Event) -> None:
        soft_limit()
        time.sleep(1)
        reached.append("after the limit")

    with pytest.raises(SoftTimeLimitExceeded):
        make(handle)(EVENT)
    assert reached == []


def test_a_soft_limit_outside_a_handler_is_not_raised_there() -> None:
    soft_limit()  # the pipeline's begin or settle: nothing raised
    time.sleep(0.01)


def test_a_soft_limit_passed_before_the_handler_is_raised_as_it_starts_once() -> None:
    soft_limit()
    calls: list[int] = []
    handler = make(lambda event: calls.append(1))
    with pytest.raises(SoftTimeLimitExceeded, match="before the handler started"):
        handler(EVENT)
    assert calls == []
    handler(EVENT)  # raised once per job: the next handler runs
    assert calls == [1]


def test_the_next_task_forgets_the_previous_tasks_limit() -> None:
    soft_limit()
    softlimit._task_ended()
    softlimit._task_started(sender=HANDLE)
    assert make(lambda event: "ran")(EVENT) == "ran"


def test_a_late_soft_limit_between_tasks_is_ignored() -> None:
    softlimit._task_ended()
    soft_limit()  # billiard's handler would raise in the pool's loop and end the child
    time.sleep(0.01)
    softlimit._task_started(sender=HANDLE)
    assert make(lambda event: "ran")(EVENT) == "ran"


def test_another_task_of_the_app_gets_the_soft_limit_where_it_is() -> None:
    softlimit._task_started(sender=Task("team.report"))
    with pytest.raises(SoftTimeLimitExceeded):
        soft_limit_then_wait()


def test_a_soft_limit_cancels_an_async_handler_which_cleans_up_and_fails_the_attempt() -> None:
    cleanup: list[str] = []

    async def handle(event: Event) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # its cleanup may await: the loop is not torn down
            cleanup.append("done")
            raise

    timer = threading.Timer(0.1, soft_limit)
    timer.start()
    started = time.monotonic()
    with pytest.raises(SoftTimeLimitExceeded, match="cancelled at the soft time limit"):
        make(handle)(EVENT, timeout_s=30)
    assert time.monotonic() - started < 5
    assert cleanup == ["done"]


def test_a_soft_limit_during_an_async_handlers_cleanup_does_not_cut_it() -> None:
    cleanup: list[str] = []

    async def handle(event: Event) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            soft_limit()  # the signal arrives while it cleans up after its own deadline
            await asyncio.sleep(0.05)
            cleanup.append("done")
            raise

    with pytest.raises(SoftTimeLimitExceeded):
        make(handle)(EVENT, timeout_s=0.05)
    assert cleanup == ["done"]


def test_a_thread_pools_tasks_do_not_share_a_limit() -> None:
    seen: list[str | None] = []
    worker = threading.Thread(target=lambda: seen.append(softlimit._limit.task))
    worker.start()
    worker.join()
    assert seen == [None]
    assert softlimit._limit.task == "pipeline"
