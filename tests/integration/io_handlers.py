"""Async handlers for the pool tests; each records its effect in the demo effects hash."""

from __future__ import annotations

import asyncio
import logging
import time

import redis
from celery.exceptions import SoftTimeLimitExceeded

from pipeline import Event, current, handler
from pipeline.core.state import Keys

log = logging.getLogger(__name__)


def _record(key: str) -> None:
    state: redis.Redis = current().state  # the attempt's context reaches the coroutine
    state.hincrby(Keys.demo_effects(), key, 1)


@handler("io.async_ok", name="io.async_ok")
async def async_ok(event: Event) -> None:
    """Waits 50 ms on the event loop, logs one line, records one effect."""
    await asyncio.sleep(0.05)
    log.info("async handler ran for %s", event.id)
    _record(str(event.id))


@handler("io.async_stuck", name="io.async_stuck")
async def async_stuck(event: Event) -> None:
    """Never finishes by itself: only the soft time limit's cancellation ends it."""
    _record(f"{event.id}:started")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        _record(f"{event.id}:cancelled")
        raise
    _record(f"{event.id}:finished")


@handler("io.sleep", name="io.sleep")
def sleep_for(event: Event) -> None:
    """A synchronous handler that waits ``payload["s"]`` seconds (``time.sleep``: a
    cooperative wait under gevent), recording when it starts and when it finishes."""
    _record(f"{event.id}:started")
    time.sleep(float(event.payload["s"]))
    _record(f"{event.id}:finished")
    _record(str(event.id))


@handler("io.mark", name="io.mark")
def mark(event: Event) -> None:
    """Records one effect per attempt: ``<event id>:<attempt>`` (a count above 1 is
    one attempt run twice)."""
    _record(f"{event.id}:{current().attempt}")


@handler("io.guarded_noop", name="io.guarded_noop", downstreams=["noop-api"])
def guarded_noop(event: Event) -> None:
    """Does nothing, behind the "noop-api" circuit breaker: what the breaker costs."""


@handler("io.guarded_sleep", name="io.guarded_sleep", downstreams=["sleep-api"])
def guarded_sleep(event: Event) -> None:
    """Sleeps ``payload["s"]`` seconds behind the "sleep-api" breaker, through its soft
    time limit (so only the hard one stops it), then records one effect."""
    deadline = time.monotonic() + float(event.payload.get("s", 0))
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            continue
    _record(str(event.id))
