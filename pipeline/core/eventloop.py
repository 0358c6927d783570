"""The event loop an ``async def`` handler runs on, and the bound on its time.

An async handler runs to completion inside its attempt (begin, checks, the handler,
settle stay one synchronous sequence): :func:`run` drives its coroutine on a loop
owned by the thread running the attempt, one loop per worker thread — the child's
only thread under prefork, each pool thread under ``threads`` — created at the
thread's first async handler and kept for its life. So a client a handler keeps per
loop (an ``httpx.AsyncClient``, an ``aiohttp`` session) is reused by the attempts
that thread runs, and no loop is shared between threads (a loop is not thread-safe).

Under ``gevent`` every attempt is a greenlet of its own on one OS thread, and
asyncio allows one running loop per OS thread: a second greenlet could neither
enter a loop that another greenlet waits in nor run one of its own. So a gevent
worker runs **one loop for the process**, in a greenlet of its own (started at the
first async handler); each attempt's greenlet hands it the coroutine and waits
for the result cooperatively (the loop's selector and the future's lock are
gevent's, so the other greenlets run meanwhile). An attempt interrupted while it
waits (gevent's hard time limit) cancels its coroutine.

Either way the coroutine runs in a copy of the attempt's context (its
:func:`pipeline.current` and log fields), and is **cancelled** at ``timeout_s``
(the tier's ``soft_time_limit_s``), failing the attempt with
``SoftTimeLimitExceeded`` (retried as any failure). That bound holds under every
pool, which is what a thread or gevent pool cannot give a synchronous handler.
Prefork's own soft limit (a signal, :mod:`pipeline.core.softlimit`) does the same:
it expires the deadline at once instead of raising inside the loop. Nothing of an
attempt outlives it: tasks it left running are cancelled with their loop, and the
thread's next async handler gets a new one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
from collections.abc import Coroutine
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from pipeline.core import softlimit
from pipeline.core.pools import green

__all__ = ["run"]

_local = threading.local()  # the calling thread's runner (prefork, threads)


def run(coro: Coroutine[Any, Any, Any], timeout_s: float | None = None) -> Any:
    """Run ``coro`` to completion on this thread's loop, cancelled at ``timeout_s``."""
    deadline = _Deadline(timeout_s)
    bounded = deadline.bound(coro)
    context = contextvars.copy_context()
    if green():
        return _run_on_shared_loop(bounded, context)
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
    loop = runner.get_loop()

    def on_soft_limit() -> None:  # a prefork soft limit: the deadline, now; not the loop
        loop.call_soon_threadsafe(deadline.expire)

    try:
        with softlimit.interruptible(on_soft_limit):
            return runner.run(bounded, context=context)
    finally:
        if asyncio.all_tasks(loop):  # left running: cancel, start a new loop
            _local.runner = None
            runner.close()


_shared: tuple[int, asyncio.AbstractEventLoop] | None = None  # (pid, the gevent worker's loop)
_shared_lock = threading.Lock()


def _shared_loop() -> asyncio.AbstractEventLoop:
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="pipeline-asyncio",
                             daemon=True).start()  # a greenlet, threading being patched
            _shared = (os.getpid(), loop)
        return _shared[1]


def _run_on_shared_loop(bounded: Coroutine[Any, Any, Any],
                        context: contextvars.Context) -> Any:
    loop = _shared_loop()
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    tasks: list[asyncio.Task[Any]] = []

    def start() -> None:
        if not done.set_running_or_notify_cancel():  # given up before it started
            bounded.close()
            return
        task = loop.create_task(bounded, context=context)
        tasks.append(task)
        task.add_done_callback(lambda t: _settle_future(t, done))

    loop.call_soon_threadsafe(start)
    try:
        return done.result()
    except BaseException:
        if not done.done():  # interrupted while waiting: the coroutine must not run on
            done.cancel()
            loop.call_soon_threadsafe(lambda: [t.cancel() for t in tasks])
        raise


def _settle_future(task: asyncio.Task[Any], done: concurrent.futures.Future[Any]) -> None:
    if done.done():
        return
    if task.cancelled():
        done.set_exception(asyncio.CancelledError())
    elif (exc := task.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(task.result())


class _Deadline:
    """An attempt's bound: ``timeout_s`` after its coroutine starts, or sooner when
    :meth:`expire` is called on the loop (a prefork soft limit, :mod:`softlimit`)."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self._timeout: asyncio.Timeout | None = None  # while the coroutine runs
        self._expired_early = False  # expired before the coroutine started

    def expire(self) -> None:
        """Cancel the coroutine now, as its own deadline would (called on the loop)."""
        if self._timeout is None:
            self._expired_early = True
        elif not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def bound(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self._expired_early:
            coro.close()
            raise SoftTimeLimitExceeded("async handler not started: past its soft time limit")
        self._timeout = asyncio.timeout(self.timeout_s)
        try:
            async with self._timeout:
                return await coro
        except TimeoutError as exc:
            if not self._timeout.expired():  # the handler's own TimeoutError: not ours
                raise
            limit = "" if self.timeout_s is None else f" ({self.timeout_s:g}s)"
            raise SoftTimeLimitExceeded(
                f"async handler cancelled at the soft time limit{limit}") from exc
        finally:
            self._timeout = None
