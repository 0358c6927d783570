"""Handlers for fault-injection tests. They record every run *directly* on the broker
named by ``FAULT_EFFECTS_URL`` (not through the resetting proxy the worker uses), so a
run is counted once whatever happens to the worker's own connections:
``fault:runs:<event id>`` is a list with one entry per run that finished,
``fault:starts:<event id>`` one per run that began."""

from __future__ import annotations

import contextlib
import os
import time
from functools import cache
from uuid import UUID

import redis
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from pipeline import Event, handler


@cache
def _client(pid: int, url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def effects() -> redis.Redis:
    """A client of this process for the effects Redis (``FAULT_EFFECTS_URL``)."""
    return _client(os.getpid(), os.environ["FAULT_EFFECTS_URL"])


def runs_key(event_id: UUID | str) -> str:
    return f"fault:runs:{event_id}"


def starts_key(event_id: UUID | str) -> str:
    return f"fault:starts:{event_id}"


class CrashPayload(BaseModel):
    crash_once: bool = False  # the first run kills its worker process before finishing


class SleepPayload(BaseModel):
    s: float


@handler("fault.record", name="fault.record", model=CrashPayload)
def record(event: Event, payload: CrashPayload) -> None:
    client = effects()
    client.rpush(starts_key(event.id), os.getpid())
    if payload.crash_once and client.set(f"fault:crashed:{event.id}", 1, nx=True):
        os._exit(1)
    client.rpush(runs_key(event.id), os.getpid())


@handler("fault.sleep", name="fault.sleep", model=SleepPayload)
def sleep(event: Event, payload: SleepPayload) -> None:
    """Sleeps ``s`` seconds, ignoring the soft time limit: a hard time limit kills it."""
    effects().rpush(starts_key(event.id), os.getpid())
    deadline = time.monotonic() + payload.s
    while (left := deadline - time.monotonic()) > 0:
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(left)
    effects().rpush(runs_key(event.id), os.getpid())
