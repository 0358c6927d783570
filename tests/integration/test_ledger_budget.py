"""The retry budget in the ledger's begin script, against the suite's real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.core.tiers import TierConfig
from pipeline.worker.batchledger import BatchLedger
from pipeline.worker.ledger import Ledger, Outcome, Try, try_key

TIER = TierConfig(retry_budget_ratio=0.5, retry_budget_min=1, retry_budget_window_s=60)


@pytest.fixture
def ledger(redis_url: str) -> Iterator[tuple[Ledger, str]]:
    client = redis.Redis.from_url(redis_url)
    yield Ledger(client, window_s=3600), f"t-{uuid.uuid4().hex[:6]}"
    client.close()


def _runs(led: Ledger, tier: str, task: str, attempt: int, *, deferrals: int = 0,
          charged: bool = False, outcome: str = "none") -> bool:
    """Begin one try; True if it may run (admitted), settled at once with ``outcome``
    (``none``: deferred or failed)."""
    key = try_key(attempt, deferrals)
    t = Try((task, key, uuid.uuid4().hex), attempt, tier, TIER, charged)
    begin = led.begin(t)
    if begin.verdict == "run":
        led.settle(task, key, Outcome(outcome), budget=t)  # type: ignore[arg-type]
    return begin.verdict == "run"


def test_retries_over_the_budget_are_refused(ledger: tuple[Ledger, str]) -> None:
    led, tier = ledger
    assert _runs(led, tier, str(uuid.uuid4()), 2)  # the minimum of 1
    assert not _runs(led, tier, str(uuid.uuid4()), 2)
    assert led.budget_exhausted_total(tier) == 1


def test_an_attempt_the_budget_admitted_before_is_not_charged_again(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    task = str(uuid.uuid4())
    assert _runs(led, tier, task, 2)  # admitted, then deferred by a breaker
    # its re-runs (new tries of the same attempt) pass an exhausted budget, uncounted
    for deferrals in range(1, 6):
        assert _runs(led, tier, task, 2, deferrals=deferrals, charged=True)
    assert led.budget_exhausted_total(tier) == 0
    assert not _runs(led, tier, str(uuid.uuid4()), 2)  # still 1 retry spent


def test_a_deferred_first_attempt_counts_again_when_it_re_runs(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    assert _runs(led, tier, str(uuid.uuid4()), 2)  # the minimum spent
    assert not _runs(led, tier, str(uuid.uuid4()), 2)
    task = str(uuid.uuid4())
    for deferrals in range(4):  # a first attempt deferred by the breaker, re-run 4 times
        _runs(led, tier, task, 1, deferrals=deferrals, charged=True)
    # 4 first attempts in the window: ratio 0.5 admits 2 retries, 1 already spent
    assert _runs(led, tier, str(uuid.uuid4()), 2)
    assert not _runs(led, tier, str(uuid.uuid4()), 2)


def test_a_retry_that_succeeds_gives_its_charge_back(ledger: tuple[Ledger, str]) -> None:
    led, tier = ledger
    for _ in range(5):  # each succeeds: the minimum of 1 is never spent
        assert _runs(led, tier, str(uuid.uuid4()), 2, outcome="done")
    assert _runs(led, tier, str(uuid.uuid4()), 2)  # fails: its charge stays
    assert not _runs(led, tier, str(uuid.uuid4()), 2)
    assert led.budget_exhausted_total(tier) == 1


def test_a_retry_success_settled_twice_gives_its_charge_back_once(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    task = str(uuid.uuid4())
    t = Try((task, try_key(2), uuid.uuid4().hex), 2, tier, TIER, False)
    assert led.begin(t).verdict == "run"  # charged: the minimum spent
    assert led.settle(task, try_key(2), Outcome("done"), budget=t)  # given back
    assert not led.settle(task, try_key(2), Outcome("done"), budget=t)  # sent again
    assert _runs(led, tier, str(uuid.uuid4()), 2)  # the one charge given back
    assert not _runs(led, tier, str(uuid.uuid4()), 2)  # and no second one


def test_a_first_attempt_success_and_a_second_settle_give_nothing_back(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    assert _runs(led, tier, str(uuid.uuid4()), 1, outcome="done")  # not a retry: no charge
    task = str(uuid.uuid4())
    assert _runs(led, tier, task, 2)  # the minimum spent
    assert not led.settle(task, try_key(2), Outcome("done"),  # settled already: no refund
                          budget=Try((task, try_key(2), "x"), 2, tier, TIER, False))
    assert not _runs(led, tier, str(uuid.uuid4()), 2)


def test_a_batched_retry_that_succeeds_gives_its_charge_back(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    batch = BatchLedger(led)
    tries = [Try((str(uuid.uuid4()), try_key(2), uuid.uuid4().hex), 2, tier, TIER, False)
             for _ in range(2)]
    assert [b.verdict for b in batch.begin_many(tries)] == ["run", "over_budget"]
    batch.start(tries[0])
    batch.settle_done(tries[0], None, redo=lambda: None)
    assert batch.close() == []  # no claim found taken over
    assert _runs(led, tier, str(uuid.uuid4()), 2)  # the success gave the minimum back
