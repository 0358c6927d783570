"""The begin and settle steps against a real Redis: verdicts, idempotency, recheck."""

from __future__ import annotations

import uuid

import pytest
import redis

from pipeline.ledger import Ledger, Outcome, try_key
from pipeline.state import Keys
from pipeline.tiers import TierConfig

TIER = TierConfig(retry_budget_ratio=0)


@pytest.fixture
def ledger(redis_url: str) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url), window_s=3600)


def _begin(ledger: Ledger, task: str, token: str, key: str = "1.0") -> str:
    return ledger.begin(task, key, token, attempt=1, tier_name="t", tier=TIER).verdict


def test_a_begin_resent_by_the_same_delivery_runs_and_another_delivery_finds_it_lost(
    ledger: Ledger,
) -> None:
    task = str(uuid.uuid4())
    assert _begin(ledger, task, "a") == "run"
    assert _begin(ledger, task, "a") == "run"  # the client retried after a lost reply
    lost = ledger.begin(task, "1.0", "b", attempt=1, tier_name="t", tier=TIER)
    assert lost.verdict == "lost"
    assert lost.previous.startswith("a ")
    assert lost.previous_process[1] > 0
    assert 0 <= lost.age_s < 5


def test_settle_is_idempotent_and_a_redelivery_of_a_settled_try_is_not_run(
    ledger: Ledger, redis_url: str,
) -> None:
    task = str(uuid.uuid4())
    zset = f"test:sched:{task}"
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("schedule", zset, b"retry-1", 5.0)) is True
    assert ledger.settle(task, "1.0", Outcome("schedule", zset, b"retry-2", 6.0)) is False
    client = redis.Redis.from_url(redis_url)
    assert client.zrange(zset, 0, -1) == [b"retry-1"]  # one outcome, not two lineages
    assert not client.exists(Keys.running(task, "1.0"))
    assert _begin(ledger, task, "c") == "settled"
    assert _begin(ledger, task, "c", key=try_key(2)) == "run"  # the next attempt is new


def test_success_writes_the_done_mark_that_every_later_try_sees(ledger: Ledger) -> None:
    task = str(uuid.uuid4())
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("done")) is True
    assert _begin(ledger, task, "b", key=try_key(1, lineage="replay")) == "done"


def test_settle_only_if_running_leaves_a_try_that_never_began(ledger: Ledger) -> None:
    task = str(uuid.uuid4())
    assert ledger.settle(task, "1.0", Outcome("none"), only_if_running=True) is False
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("none"), only_if_running=True) is True


def test_recheck_schedules_the_try_again_and_leaves_it_unsettled(
    ledger: Ledger, redis_url: str,
) -> None:
    task = str(uuid.uuid4())
    zset = f"test:sched:{task}"
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("recheck", zset, b"again", 9.0)) is True
    assert redis.Redis.from_url(redis_url).zscore(zset, b"again") == 9.0
    assert _begin(ledger, task, "b") == "lost"  # still running elsewhere, not settled
