"""``async def`` handlers: run to completion in their attempt, on their thread's loop,
cancelled at the soft time limit."""

from __future__ import annotations

import asyncio
import threading

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from pipeline.core.events import Event
from pipeline.core.handlers import Handler, HandlerContext, current, running


def make(func: object) -> Handler:
    return Handler(name="t.async", pattern="t.*", func=func)  # type: ignore[arg-type]


EVENT = Event(type="t.x", source="tests")
CTX = HandlerContext(task_id="task-1", handler="t.async", tier="io", attempt=1,
                     max_attempts=3, state=None)


def test_an_async_handler_runs_to_completion_and_its_result_is_returned() -> None:
    async def handle(event: Event) -> str:
        await asyncio.sleep(0.01)
        return f"handled {event.type}"

    assert make(handle)(EVENT) == "handled t.x"


def test_an_async_handler_sees_the_context_of_its_attempt() -> None:
    async def handle(event: Event) -> str:
        await asyncio.sleep(0)
        return current().task_id

    with running(CTX):
        assert make(handle)(EVENT) == "task-1"


def test_an_async_handler_past_its_timeout_is_cancelled_as_a_soft_time_limit() -> None:
    cancelled: list[str] = []

    async def handle(event: Event) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append("yes")
            raise

    with pytest.raises(SoftTimeLimitExceeded, match="soft time limit"):
        make(handle)(EVENT, timeout_s=0.05)
    assert cancelled == ["yes"]


def test_a_handlers_own_timeout_error_is_not_taken_for_the_soft_limit() -> None:
    async def handle(event: Event) -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    with pytest.raises(TimeoutError):
        make(handle)(EVENT, timeout_s=5)


def test_attempts_on_one_thread_share_its_loop_and_other_threads_have_their_own() -> None:
    async def loop_id(event: Event) -> int:
        return id(asyncio.get_running_loop())

    handler = make(loop_id)
    here = [handler(EVENT), handler(EVENT)]
    there: list[int] = []
    thread = threading.Thread(target=lambda: there.append(handler(EVENT)))
    thread.start()
    thread.join()
    assert here[0] == here[1]
    assert there[0] != here[0]


def test_tasks_an_attempt_leaves_running_are_cancelled_when_it_returns() -> None:
    cancelled: list[str] = []

    async def background() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append("background")
            raise

    async def leaves_a_task(event: Event) -> int:
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(0)
        return id(asyncio.get_running_loop())

    handler = make(leaves_a_task)
    handler(EVENT)
    assert cancelled == ["background"]
    handler(EVENT)  # the thread's next async handler runs on a new loop
    assert cancelled == ["background", "background"]
