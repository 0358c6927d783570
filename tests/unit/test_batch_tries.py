"""A batch's tries and attempts, built once per message: the same as one by one."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.worker.attempt import Attempt
from pipeline.worker.batch import batch_attempts, batch_tries
from pipeline.worker.runtime import Runtime, runtime_for

KWARGS: dict[str, Any] = {"handler": "demo.noop", "tier": "bulk", "attempt": 2,
                          "accepted_at": 1.0, "lineage": "abc", "deferrals": 1, "lost": 1,
                          "budget_charged": True, "first_failed_at": "2026-01-01T00:00:00Z"}
EVENTS = [{"id": f"e{i}", "type": "demo.noop", "source": "s", "payload": {"n": i}}
          for i in range(3)]


@pytest.fixture
def rt() -> Runtime:
    return runtime_for(create_app(load_settings(broker_url="redis://127.0.0.1:1/0"),
                                  main="batch-tries"))


def test_each_attempt_of_a_batch_is_the_attempt_its_own_message_would_build(
    rt: Runtime,
) -> None:
    for attempt in batch_attempts(rt, EVENTS, KWARGS):
        fresh = Attempt(rt, attempt.task_id, attempt.event, KWARGS, token=attempt.token)
        assert vars(attempt) == {**vars(fresh), "_try": attempt.as_try()}
        assert attempt.as_try() == fresh.as_try()


def test_attempts_of_one_batch_share_no_mutable_state(rt: Runtime) -> None:
    first, second, _ = batch_attempts(rt, EVENTS, KWARGS)
    for name, value in vars(first).items():
        if isinstance(value, list | dict | set):
            assert value is not getattr(second, name), name
    first.records.append(("downstream", True))
    assert second.records == []


def test_a_batch_s_tries_have_their_own_task_ids_and_tokens_from_one_random_part(
    rt: Runtime,
) -> None:
    tries = batch_tries(rt, EVENTS, KWARGS)
    assert len({t.ids[0] for t in tries}) == len({t.ids[2] for t in tries}) == 3
    assert len({t.ids[2][:-6] for t in tries}) == 1  # the batch's part, then the index
    assert {(t.ids[1], t.attempt, t.tier_name, t.charged) for t in tries} == {
        ("abc/2.1", 2, "bulk", True)}
