"""Backoff maths and the retry-or-dead-letter decision."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.core.retry import Reason, compute_backoff, compute_deferral, decide, exception_matches
from pipeline.core.tiers import TierConfig
from pipeline.errors import PermanentError, RetryAfter

ALMOST_ONE = 0.999999


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 9, 200])
def test_backoff_stays_within_zero_and_the_capped_window(attempt: int) -> None:
    base, cap = 2.0, 300.0
    window = min(cap, base * 2 ** (attempt - 1))
    low = compute_backoff(attempt, base_s=base, max_s=cap, rand=lambda: 0.0)
    high = compute_backoff(attempt, base_s=base, max_s=cap, rand=lambda: ALMOST_ONE)
    assert low == 0.0
    assert high == pytest.approx(window * ALMOST_ONE)
    assert high <= window


def test_backoff_window_doubles_per_attempt_below_the_cap() -> None:
    windows = [compute_backoff(n, base_s=1.0, max_s=1000.0, rand=lambda: 0.5) for n in (1, 2, 3)]
    assert windows == [0.5, 1.0, 2.0]


def test_backoff_at_very_large_attempts_is_capped() -> None:
    assert compute_backoff(200, base_s=2.0, max_s=60.0, rand=lambda: ALMOST_ONE) < 60.0


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_rejects_attempt_below_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt must be >= 1"):
        compute_backoff(attempt, base_s=1.0, max_s=10.0)


def test_deferral_waits_out_the_breaker_cool_down_at_least() -> None:
    assert compute_deferral(3.5, spread_s=10.0, deferrals=0, rand=lambda: 0.0) == 3.5


@pytest.mark.parametrize(("deferrals", "window_s"), [(0, 10.0), (1, 20.0), (2, 40.0), (9, 40.0)])
def test_deferral_jitter_window_doubles_per_deferral_up_to_four_cool_downs(
        deferrals: int, window_s: float) -> None:
    high = compute_deferral(1.0, spread_s=10.0, deferrals=deferrals, rand=lambda: ALMOST_ONE)
    assert high == pytest.approx(1.0 + window_s * ALMOST_ONE)


def test_deferrals_of_a_crowd_spread_over_the_window() -> None:
    rng = random.Random(7)
    delays = [compute_deferral(1.0, spread_s=10.0, deferrals=0, rand=rng.random)
              for _ in range(1000)]
    assert min(delays) >= 1.0
    assert max(delays) <= 11.0
    assert sum(d < 6.0 for d in delays) == pytest.approx(500, abs=60)  # uniform, not a wall


def test_permanent_error_is_not_retried() -> None:
    decision = decide(PermanentError("bad"), attempt=1, tier=TierConfig())
    assert (decision.retry, decision.reason) == (False, Reason.PERMANENT_ERROR)


@pytest.mark.parametrize(
    ("names", "exc"),
    [
        (["KeyError"], KeyError("k")),
        (["json.JSONDecodeError"], json.JSONDecodeError("bad", "doc", 0)),
    ],
)
def test_exception_in_dont_retry_on_is_permanent(names: list[str], exc: Exception) -> None:
    decision = decide(exc, attempt=1, tier=TierConfig(dont_retry_on=names))
    assert (decision.retry, decision.reason) == (False, Reason.PERMANENT_ERROR)


def test_dont_retry_on_matches_subclasses() -> None:
    # JSONDecodeError subclasses ValueError
    tier = TierConfig(dont_retry_on=["ValueError"])
    decision = decide(json.JSONDecodeError("bad", "doc", 0), attempt=1, tier=tier)
    assert decision.reason == Reason.PERMANENT_ERROR


def test_exception_not_in_retry_on_is_permanent() -> None:
    decision = decide(ValueError("x"), attempt=1, tier=TierConfig(retry_on=["TimeoutError"]))
    assert (decision.retry, decision.reason) == (False, Reason.PERMANENT_ERROR)


def test_ordinary_failure_is_retried_with_jittered_backoff() -> None:
    tier = TierConfig(backoff_base_s=2.0, backoff_max_s=300.0)
    decision = decide(ValueError("x"), attempt=3, tier=tier, rand=lambda: 0.5)
    assert decision == decide(ValueError("y"), attempt=3, tier=tier, rand=lambda: 0.5)
    assert (decision.retry, decision.delay_s, decision.reason) == (True, 4.0, None)


def test_last_allowed_retry_is_still_retried() -> None:
    assert decide(ValueError("x"), attempt=3, tier=TierConfig(max_retries=3)).retry


def test_attempt_beyond_max_retries_is_exhausted() -> None:
    decision = decide(ValueError("x"), attempt=4, tier=TierConfig(max_retries=3))
    assert (decision.retry, decision.reason) == (False, Reason.RETRIES_EXHAUSTED)


def test_retry_after_gives_its_exact_delay() -> None:
    decision = decide(RetryAfter(7.25), attempt=1, tier=TierConfig(backoff_max_s=1.0,
                                                                   backoff_base_s=1.0))
    assert (decision.retry, decision.delay_s) == (True, 7.25)


def test_retry_after_is_retried_even_when_retry_on_does_not_list_it() -> None:
    assert decide(RetryAfter(1), attempt=1, tier=TierConfig(retry_on=["KeyError"])).retry


def test_retry_after_still_respects_max_retries() -> None:
    decision = decide(RetryAfter(1), attempt=2, tier=TierConfig(max_retries=1))
    assert decision.reason == Reason.RETRIES_EXHAUSTED


def test_retry_after_rejects_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay_s must be >= 0"):
        RetryAfter(-1)


def test_unimportable_name_still_matches_by_qualified_class_name() -> None:
    timeout = type("Timeout", (Exception,), {"__module__": "not_installed_lib.exceptions"})
    assert exception_matches(timeout(), ["not_installed_lib.exceptions.Timeout"])
    assert not exception_matches(timeout(), ["not_installed_lib.exceptions.Other"])


def test_unimportable_name_matches_a_subclass_by_its_base_qualified_name() -> None:
    base = type("Timeout", (Exception,), {"__module__": "not_installed_lib.exceptions"})
    sub = type("ReadTimeout", (base,), {"__module__": "not_installed_lib.exceptions"})
    assert exception_matches(sub(), ["not_installed_lib.exceptions.Timeout"])


def test_name_that_resolves_matches_only_instances() -> None:
    assert exception_matches(KeyError("k"), ["LookupError"])
    assert not exception_matches(ValueError("v"), ["LookupError", "json.JSONDecodeError"])
