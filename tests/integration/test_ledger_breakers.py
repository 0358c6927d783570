"""The circuit breakers folded into a try's begin and settle scripts, against the
suite's real Redis: one round trip before the handler, one after, with the same
decisions as asking the breakers on their own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from pipeline.config.model import BreakerConfig
from pipeline.core.state import Keys
from pipeline.core.tiers import TierConfig
from pipeline.worker.breaker import Breakers
from pipeline.worker.ledger import Ledger, Outcome, Try, try_key

CFG = BreakerConfig(consecutive_failures=3, open_s=5, half_open_probes=1, min_calls=100)
TIER = TierConfig(retry_budget_ratio=0)


@dataclass
class Fold:
    client: redis.Redis
    ledger: Ledger
    breakers: Breakers
    names: tuple[str, str]

    def try_(self) -> Try:
        return Try((uuid.uuid4().hex, try_key(1), uuid.uuid4().hex), 1, "t", TIER, False)

    def gates(self, t: Try, *names: str) -> list[tuple[list[str], list[object]]]:
        return [self.breakers.allow_call(n, token=f"{t.ids[0]}:{n}") for n in names]

    def records(self, t: Try, ok: bool | None, *names: str) -> list[tuple[list[str], list[object]]]:
        return [self.breakers.record_call(n, ok, token=f"{t.ids[0]}:{n}") for n in names]

    def open(self, name: str) -> None:
        for _ in range(3):
            self.breakers.record(name, ok=False)
        assert self.breakers.status(name)["state"] == "open"

    def half_open(self, name: str) -> None:
        self.open(name)
        self.client.hset(Keys.breaker(name), "opened_at", 0)  # its cool-down is over


@pytest.fixture
def fold(redis_url: str) -> Iterator[Fold]:
    client = redis.Redis.from_url(redis_url)
    names = (f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}")
    yield Fold(client, Ledger(client, window_s=3600),
               Breakers(client, dict.fromkeys(names, CFG)), names)
    client.close()


def test_the_begin_lets_a_try_through_closed_breakers(fold: Fold) -> None:
    t = fold.try_()
    begin = fold.ledger.begin(t, fold.gates(t, *fold.names))
    assert (begin.verdict, begin.gated, begin.denied_by) == ("run", True, 0)


def test_an_open_breaker_denies_the_try_in_its_begin(fold: Fold) -> None:
    a, b = fold.names
    fold.open(b)
    t = fold.try_()
    begin = fold.ledger.begin(t, fold.gates(t, a, b))
    assert (begin.verdict, begin.denied_by) == ("run", 2)
    assert 4 < begin.retry_in_s <= 5


def test_a_denial_gives_back_the_probe_leases_granted_before_it(fold: Fold) -> None:
    a, b = fold.names
    fold.half_open(a)
    fold.open(b)
    t = fold.try_()
    assert fold.ledger.begin(t, fold.gates(t, a, b)).denied_by == 2
    assert fold.client.zcard(Keys.breaker_probes(a)) == 0  # a's slot is free again
    other = fold.try_()
    assert fold.ledger.begin(other, fold.gates(other, a)).denied_by == 0


def test_a_try_that_may_not_run_asks_no_breaker(fold: Fold) -> None:
    a, _ = fold.names
    fold.half_open(a)
    t = fold.try_()
    task_id, key, _ = t.ids
    fold.ledger.settle(task_id, key, Outcome("done"))
    begin = fold.ledger.begin(t, fold.gates(t, a))
    assert (begin.verdict, begin.gated) == ("done", False)
    assert fold.client.zcard(Keys.breaker_probes(a)) == 0  # no probe slot taken


@pytest.mark.parametrize("ok", [False, True], ids=["failure", "success"])
def test_the_settle_records_each_outcome_once_even_when_sent_again(
    fold: Fold, ok: bool,
) -> None:
    a, _ = fold.names
    t = fold.try_()
    task_id, key, _ = t.ids
    fold.ledger.begin(t, fold.gates(t, a))
    records = fold.records(t, ok, a)
    # a success keeps only its done mark: a second settle is found by that mark
    outcome = Outcome("done") if ok else Outcome("schedule", f"sched-{task_id}", b"next", 1.0)
    assert fold.ledger.settle_recorded(task_id, key, outcome, records=records) == \
        (True, ["closed"])
    # the same settle again (its reply was lost to a connection reset): nothing counted
    assert fold.ledger.settle_recorded(task_id, key, outcome, records=records) == \
        (False, [""])
    assert fold.breakers.status(a)["consecutive_failures"] == (0 if ok else 1)
    calls = sum(int(fold.client.hget(k, "calls") or 0)
                for k in fold.client.scan_iter(f"{Keys.breaker(a)}:w:*"))
    assert calls == 1


def test_the_settle_that_closes_a_breaker_says_recovered_and_frees_its_probe(
    fold: Fold,
) -> None:
    a, _ = fold.names
    fold.half_open(a)
    t = fold.try_()
    task_id, key, _ = t.ids
    assert fold.ledger.begin(t, fold.gates(t, a)).denied_by == 0
    assert fold.client.zcard(Keys.breaker_probes(a)) == 1  # the probe's lease
    written, states = fold.ledger.settle_recorded(task_id, key, Outcome("done"),
                                                  records=fold.records(t, True, a))
    assert (written, states) == (True, ["recovered"])
    assert fold.breakers.status(a)["state"] == "closed"
    assert fold.client.zcard(Keys.breaker_probes(a)) == 0


def test_an_uncounted_outcome_only_gives_the_probe_slot_back(fold: Fold) -> None:
    a, _ = fold.names
    fold.half_open(a)
    t = fold.try_()
    task_id, key, _ = t.ids
    fold.ledger.begin(t, fold.gates(t, a))
    deferred = Outcome("schedule", f"sched-{task_id}", b"later", 1.0)  # RetryAfter
    assert fold.ledger.settle_recorded(task_id, key, deferred,
                                       records=fold.records(t, None, a)) == (True, [""])
    assert fold.breakers.status(a)["state"] == "half_open"
    assert fold.client.zcard(Keys.breaker_probes(a)) == 0
