"""Demo handlers, for the local stack, the docs, the benchmarks and the tests.

Loaded only when ``pipeline.demo`` is in ``handler_modules``: a production
worker must never run ``demo.crash``. Every successful handling counts its
side effect in the Redis hash ``pipeline:demo:effects`` (event id -> times
run), so :func:`report` can account for any run: processed events and
duplicate effects.

The README's example classes, one per tier by the default rules:
``reward.granted`` (critical; credits a demo wallet), ``game.*`` (high; calls
the demo downstream, which fails ``payload.fail_rate`` of its calls),
``interaction.*`` (standard) and ``analytics.*`` (bulk).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun
from pydantic import BaseModel, Field

from pipeline.core.events import Event
from pipeline.core.handlers import current, handler
from pipeline.core.state import Keys
from pipeline.errors import PermanentError, RetryAfter
from pipeline.worker.runtime import runtime_for

__all__ = ["DEMO_DOWNSTREAM", "DemoTransientError", "calls_key", "down_key", "fixed_key",
           "report", "wallets_key"]


class DemoTransientError(RuntimeError):
    """A failure that retrying may fix (what ``demo.flaky`` and ``demo.fail`` raise)."""


class SlowPayload(BaseModel):
    ms: int = Field(default=100, ge=0, le=600_000)
    ignore_soft_limit: bool = False  # keep sleeping past the soft limit: meet the hard one


class FlakyPayload(BaseModel):
    fail_rate: float = Field(default=0.5, ge=0.0, le=1.0)


class RetryAfterPayload(BaseModel):
    delay_s: float = Field(default=1.0, ge=0, le=3600)
    fail_times: int = Field(default=1, ge=0, le=100)


class TypedPayload(BaseModel):
    user_id: int
    amount: int = Field(ge=0)


class Granted(BaseModel):
    """A reward grant, as in the README."""

    user_id: int
    amount: int = Field(ge=0)


class GameUpdate(BaseModel):
    user_id: int | None = None
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)  # of the calls to demo-api


def _record(event: Event, suffix: str = "") -> None:
    state: redis.Redis = current().state
    state.hincrby(Keys.demo_effects(), f"{event.id}{suffix}", 1)


@handler("demo.ok", name="demo.ok")
def ok(event: Event) -> None:
    """Succeeds; ``payload.poison`` makes it fail every time (a poisoned event)."""
    if event.payload.get("poison"):
        raise DemoTransientError("poisoned event")
    _record(event)


@handler("demo.noop", name="demo.noop")
def noop(event: Event) -> None:
    """Does nothing at all: for throughput benchmarks."""


@handler("demo.slow", name="demo.slow", model=SlowPayload)
def slow(event: Event, payload: SlowPayload) -> None:
    deadline = time.monotonic() + payload.ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        try:
            time.sleep(left)
        except SoftTimeLimitExceeded:
            if not payload.ignore_soft_limit:
                raise
    _record(event)


DEMO_DOWNSTREAM = "demo-api"  # the downstream demo.flaky calls (a circuit breaker name)


@handler("demo.flaky", name="demo.flaky", model=FlakyPayload, downstreams=[DEMO_DOWNSTREAM])
def flaky(event: Event, payload: FlakyPayload) -> None:
    """Calls "demo-api": fails with probability ``fail_rate``, and always while
    ``pipeline demo down demo-api`` holds it down. Every call is counted."""
    _call_downstream(payload.fail_rate)
    _record(event)


def _call_downstream(fail_rate: float) -> None:
    """One call to the demo downstream: counted; fails while it is held down, and
    with probability ``fail_rate``."""
    state: redis.Redis = current().state
    state.incr(calls_key(DEMO_DOWNSTREAM))
    if state.exists(down_key(DEMO_DOWNSTREAM)):
        raise DemoTransientError(f"{DEMO_DOWNSTREAM} is down (connection refused)")
    if random.random() < fail_rate:
        raise DemoTransientError(f"{DEMO_DOWNSTREAM} failed (fail_rate={fail_rate})")


@handler("reward.granted", name="demo.reward", model=Granted)
def credit_wallet(event: Event, payload: Granted) -> None:
    """Credits the user's demo wallet (the README's example)."""
    current().state.hincrby(wallets_key(), str(payload.user_id), payload.amount)
    _record(event)


@handler("game.*", name="demo.game", model=GameUpdate, downstreams=[DEMO_DOWNSTREAM])
def update_game(event: Event, payload: GameUpdate) -> None:
    """Pushes a game update to "demo-api" (through its circuit breaker)."""
    _call_downstream(payload.fail_rate)
    _record(event)


@handler("interaction.*", name="demo.interaction")
def track_interaction(event: Event) -> None:
    _record(event)


@handler("analytics.*", name="demo.analytics")
def ingest_analytics(event: Event) -> None:
    _record(event)


def wallets_key() -> str:
    """Hash: demo user id -> balance credited by ``reward.granted`` events."""
    return f"{Keys.prefix}demo:wallets"


def down_key(downstream: str) -> str:
    """Set: the demo downstream is fully down."""
    return f"{Keys.prefix}demo:down:{downstream}"


def calls_key(downstream: str) -> str:
    """Counter: calls the demo handlers made to ``downstream``."""
    return f"{Keys.prefix}demo:calls:{downstream}"


@handler("demo.fail", name="demo.fail")
def fail(event: Event) -> None:
    """Always fails, until ``pipeline demo fix demo.fail`` "deploys the fix"."""
    current().state.incr(calls_key("demo.fail"))
    if current().state.exists(fixed_key("demo.fail")):
        _record(event)
        return
    raise DemoTransientError(f"demo.fail always fails (attempt {current().attempt})")


def fixed_key(handler_name: str) -> str:
    """Set: the demo handler ``handler_name`` behaves as if its bug were fixed."""
    return f"{Keys.prefix}demo:fixed:{handler_name}"


@handler("demo.echo", name="demo.echo")
def echo(event: Event) -> None:
    """Always fails, quoting its payload in the error, as careless handlers do: what
    ``redact_paths`` masks in failure text (logs, Flower, DLQ views)."""
    raise DemoTransientError(f"demo.echo refused payload {event.payload}")


@handler("demo.invalid", name="demo.invalid")
def invalid(event: Event) -> None:
    raise PermanentError("demo.invalid can never succeed")


@handler("demo.retry_after", name="demo.retry_after", model=RetryAfterPayload)
def retry_after(event: Event, payload: RetryAfterPayload) -> None:
    """Asks for a delay of ``delay_s`` on its first ``fail_times`` calls, then succeeds."""
    calls = current().state.incr(f"{Keys.prefix}demo:calls:retry_after:{event.id}")
    if calls <= payload.fail_times:
        raise RetryAfter(payload.delay_s, "downstream said Retry-After")
    _record(event)


@handler("demo.typed", name="demo.typed", model=TypedPayload)
def typed(event: Event, payload: TypedPayload) -> None:
    _record(event)


@handler("demo.crash", name="demo.crash")
def crash(event: Event) -> None:
    os._exit(13)  # the worker child dies mid-task, as on a segfault or the OOM killer


@handler("demo.fanout", name="demo.fanout.ok")
def fanout_ok(event: Event) -> None:
    _record(event, "#ok")


@handler("demo.fanout", name="demo.fanout.fail")
def fanout_fail(event: Event) -> None:
    raise DemoTransientError("demo.fanout.fail always fails")


@task_postrun.connect
def _crash_once_after_success(sender: Any = None, args: Any = None, state: Any = None,
                              **_: Any) -> None:
    """``payload.crash_once_after_success``: the worker child dies after the handler
    succeeded and before the message is acknowledged — once per event."""
    if state != "SUCCESS" or not args or not isinstance(args[0], dict):
        return
    event = args[0]
    if not event.get("payload", {}).get("crash_once_after_success"):
        return
    client = runtime_for(sender.app).state
    if client.set(f"{Keys.prefix}demo:crashed:{event.get('id')}", "1", nx=True, ex=3600):
        os._exit(14)


def report(state: redis.Redis, *, with_ids: bool = False) -> dict[str, Any]:
    """``{"processed": N, "duplicate_effects": M[, "ids": [...]]}`` from the effect log."""
    raw: dict[bytes, bytes] = state.hgetall(Keys.demo_effects())  # type: ignore[assignment]
    effects = {k.decode(): int(v) for k, v in raw.items()}
    result: dict[str, Any] = {
        "processed": len(effects),
        "duplicate_effects": sum(n - 1 for n in effects.values() if n > 1),
    }
    if with_ids:
        result["ids"] = sorted(effects)
    return result
