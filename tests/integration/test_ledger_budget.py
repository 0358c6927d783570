"""The retry budget in the ledger's begin script, against the suite's real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.ledger import Ledger
from pipeline.tiers import TierConfig

TIER = TierConfig(retry_budget_ratio=0.5, retry_budget_min=1, retry_budget_window_s=60)


@pytest.fixture
def ledger(redis_url: str) -> Iterator[tuple[Ledger, str]]:
    client = redis.Redis.from_url(redis_url)
    yield Ledger(client, window_s=3600), f"t-{uuid.uuid4().hex[:6]}"
    client.close()


def test_retries_over_the_budget_are_refused(ledger: tuple[Ledger, str]) -> None:
    led, tier = ledger
    assert led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted  # the minimum of 1
    assert not led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted
    assert led.budget_exhausted_total(tier) == 1


def test_an_attempt_the_budget_admitted_before_is_not_charged_again(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    task = str(uuid.uuid4())
    assert led.begin(task, 2, tier, TIER).admitted  # admitted, then deferred by a breaker
    led.clear(task, 2)
    # its re-run passes an exhausted budget and does not count as another retry
    for _ in range(5):
        begin = led.begin(task, 2, tier, TIER, charged=True)
        assert begin.admitted
        led.clear(task, 2)
    assert led.budget_exhausted_total(tier) == 0
    assert not led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted  # still 1 retry spent


def test_a_deferred_first_attempt_counts_again_when_it_re_runs(
    ledger: tuple[Ledger, str],
) -> None:
    led, tier = ledger
    assert led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted  # the minimum spent
    assert not led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted
    task = str(uuid.uuid4())
    for _ in range(4):  # a first attempt deferred by the breaker, re-run 4 times
        led.begin(task, 1, tier, TIER, charged=True)
        led.clear(task, 1)
    # 4 first attempts in the window: ratio 0.5 admits 2 retries, 1 already spent
    assert led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted
    assert not led.begin(str(uuid.uuid4()), 2, tier, TIER).admitted
