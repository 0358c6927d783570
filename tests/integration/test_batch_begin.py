"""A batch begun on its stream, and one whose stream cannot begin it (the ledger's
own begins then), run in this process against a real Redis: the same outcomes."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.state import Keys
from pipeline.worker.batch import batch_outcomes, run_batch
from pipeline.worker.runtime import Runtime, runtime_for
from pipeline.worker.settlestream import SettleStream

GOOD = 5  # events with a valid demo.typed payload
BAD_AT = 2  # where the one invalid payload sits in the batch


@pytest.fixture
def rt(redis_url: str) -> Runtime:
    settings = load_settings(broker_url=redis_url, handler_modules=["pipeline.demo"])
    rt = runtime_for(create_app(settings, main="batch-begin"))
    rt.load_handlers()  # as the worker does at start
    return rt


def _batch() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "type": "demo.typed", "source": "tests",
         "payload": {"user_id": i, "amount": 1}} for i in range(GOOD)]
    events.insert(BAD_AT, {"id": str(uuid.uuid4()), "type": "demo.typed", "source": "tests",
                           "payload": {"user_id": 9, "amount": -1}})
    kwargs = {"handler": "demo.typed", "tier": "bulk", "attempt": 1, "accepted_at": 1.0,
              "lineage": uuid.uuid4().hex[:12]}
    return events, kwargs


def _stream_begin_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream's begin answers None before ``meanwhile`` ran, as after a write that
    failed (a connection reset): the batch must begin its tries the ledger's way."""
    def failed(self: SettleStream, calls: Any, meanwhile: Callable[[], object] | None = None
               ) -> None:
        self._broken = True
        return None

    monkeypatch.setattr(SettleStream, "begin_many", failed)


@pytest.mark.parametrize("begin", ["on the stream", "stream failed"])
def test_a_batch_runs_each_valid_event_once_and_dead_letters_the_invalid_one_however_begun(
        rt: Runtime, redis_url: str, monkeypatch: pytest.MonkeyPatch, begin: str) -> None:
    if begin == "stream failed":
        _stream_begin_fails(monkeypatch)
    events, kwargs = _batch()
    result = run_batch(rt, events, kwargs)

    assert dict(batch_outcomes(result)) == {"succeeded": GOOD,
                                            "dead_lettered:invalid_payload": 1}, result
    state = redis.Redis.from_url(redis_url)
    effects = state.hmget(Keys.demo_effects(), [e["id"] for e in events])
    assert [int(n or 0) for n in effects] == [0 if i == BAD_AT else 1
                                              for i in range(len(events))]
    dead = [r for r in rt.dlq.records() if r.event_id == events[BAD_AT]["id"]]
    assert [r.reason for r in dead] == ["invalid_payload"]
    assert "amount" in dead[0].message  # the field that failed, for whoever replays it
    # a redelivery of the same batch runs nothing again: each try is done or settled
    again = run_batch(rt, events, kwargs)
    assert sum(n for _, n in batch_outcomes(again)) == len(events)
    assert "succeeded" not in dict(batch_outcomes(again)), again
    assert state.hmget(Keys.demo_effects(), [e["id"] for e in events]) == effects
