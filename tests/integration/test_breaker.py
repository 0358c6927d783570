"""Circuit breaker state machine, against the suite's real Redis (no workers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from pipeline.config.model import BreakerConfig
from pipeline.worker.breaker import Breakers

CFG = BreakerConfig(failure_ratio=0.5, min_calls=4, consecutive_failures=3, window_s=10,
                    open_s=5, half_open_probes=1)


@pytest.fixture
def breakers(redis_url: str) -> Iterator[tuple[Breakers, str]]:
    client = redis.Redis.from_url(redis_url)
    name = f"api-{uuid.uuid4().hex[:6]}"
    yield Breakers(client, {name: CFG}), name
    client.close()


def test_consecutive_failures_open_the_breaker(breakers: tuple[Breakers, str]) -> None:
    b, name = breakers
    states = [b.record(name, ok=False, now=100.0 + i) for i in range(3)]
    assert states == ["closed", "closed", "open"]
    status = b.allow(name, now=104.0)
    assert status.state == "open"
    assert status.retry_in_s == pytest.approx(3.0)


def test_failure_ratio_over_min_calls_opens_it(breakers: tuple[Breakers, str]) -> None:
    b, name = breakers
    for i, ok in enumerate([True, False, True, False]):
        state = b.record(name, ok=ok, now=100.0 + i / 10)
    assert state == "open"  # 2 of 4 failed: ratio 0.5 reached at min_calls


def test_old_failures_leave_the_window(breakers: tuple[Breakers, str]) -> None:
    b, name = breakers
    b.record(name, ok=False, now=100.0)
    b.record(name, ok=True, now=100.5)
    b.record(name, ok=False, now=101.0)
    # 30 s later the window holds only the new calls: 1 failure in 4 stays closed.
    states = [b.record(name, ok=ok, now=131.0 + i / 10) for i, ok in
              enumerate([True, True, True, False])]
    assert states[-1] == "closed"


def test_after_the_cool_down_one_probe_passes_and_success_closes(
    breakers: tuple[Breakers, str],
) -> None:
    b, name = breakers
    for i in range(3):
        b.record(name, ok=False, now=100.0 + i)
    assert b.allow(name, now=108.0).state == "half_open"  # the probe
    assert b.allow(name, now=108.1).retry_in_s > 0  # only one probe at a time
    assert b.record(name, ok=True, now=108.2) == "closed"
    assert b.allow(name, now=108.3).retry_in_s == 0


def test_closing_after_a_probe_forgets_the_failures_that_opened_it(
    breakers: tuple[Breakers, str],
) -> None:
    b, name = breakers
    for i, ok in enumerate([True, False, False, False]):  # 3 of 4 failed: open
        b.record(name, ok=ok, now=100.0 + i / 10)
    assert b.allow(name, now=106.0).state == "half_open"
    assert b.record(name, ok=True, now=106.1) == "closed"
    # Still inside the 10 s window of those failures: one ordinary failure among
    # ordinary calls must not reopen it (4 calls, 1 failure, fresh window).
    states = [b.record(name, ok=ok, now=106.2 + i / 10) for i, ok in
              enumerate([True, True, False, True])]
    assert states == ["closed"] * 4


def test_failed_probe_opens_it_again(breakers: tuple[Breakers, str]) -> None:
    b, name = breakers
    for i in range(3):
        b.record(name, ok=False, now=100.0 + i)
    assert b.allow(name, now=108.0).retry_in_s == 0
    assert b.record(name, ok=False, now=108.5) == "open"
    assert b.allow(name, now=110.0).retry_in_s == pytest.approx(3.5)


def test_manual_override_forces_and_close_resets(breakers: tuple[Breakers, str]) -> None:
    b, name = breakers
    b.force(name, "open")
    assert b.allow(name).state == "forced_open"
    assert b.status(name)["state"] == "forced_open"
    b.force(name, None)
    assert b.allow(name).state == "closed"


def test_only_the_outcome_that_closes_it_is_told_of_the_recovery(
    breakers: tuple[Breakers, str],
) -> None:
    b, name = breakers
    told: list[str] = []
    for i in range(3):
        b.record(name, ok=False, now=100.0 + i, on_recovered=lambda: told.append("no"))
    assert b.allow(name, now=108.0).state == "half_open"
    assert b.record(name, ok=True, now=108.2, on_recovered=lambda: told.append("yes")) == "closed"
    assert b.record(name, ok=True, now=108.3, on_recovered=lambda: told.append("again")) \
        == "closed"
    assert told == ["yes"]


@pytest.fixture
def opened_with(redis_url: str) -> Iterator[Callable[[int], tuple[Breakers, str]]]:
    """A breaker with ``half_open_probes`` probes that three failures opened at 102 s."""
    client = redis.Redis.from_url(redis_url)

    def opened(probes: int) -> tuple[Breakers, str]:
        name = f"api-{uuid.uuid4().hex[:6]}"
        b = Breakers(client, {name: CFG.model_copy(update={"half_open_probes": probes})})
        for i in range(3):
            b.record(name, ok=False, now=100.0 + i)
        return b, name

    yield opened
    client.close()


def test_probes_are_judged_together_one_failure_among_them_does_not_reopen(
    opened_with: Callable[[int], tuple[Breakers, str]],
) -> None:
    b, name = opened_with(3)
    probes = [b.allow(name, now=108.0 + i / 10) for i in range(3)]
    assert [p.retry_in_s for p in probes] == [0, 0, 0]
    assert b.allow(name, now=108.4).retry_in_s > 0  # three at once, no more
    assert b.record(name, ok=False, now=108.5, token=probes[0].token) == "half_open"
    refill = b.allow(name, now=108.6)  # a failed probe frees its slot for the next
    assert refill.retry_in_s == 0
    assert b.record(name, ok=True, now=108.7, token=probes[1].token) == "closed"


def test_every_probe_failing_opens_it_again_and_a_new_half_open_counts_afresh(
    opened_with: Callable[[int], tuple[Breakers, str]],
) -> None:
    b, name = opened_with(2)
    first, second = b.allow(name, now=108.0), b.allow(name, now=108.1)
    assert b.record(name, ok=False, now=108.2, token=first.token) == "half_open"
    assert b.record(name, ok=False, now=108.3, token=second.token) == "open"
    assert b.allow(name, now=110.0).retry_in_s == pytest.approx(3.3)
    # The next half-open period starts with no failed probe: one failure is not enough.
    again = b.allow(name, now=113.4)
    assert b.record(name, ok=False, now=113.5, token=again.token) == "half_open"
