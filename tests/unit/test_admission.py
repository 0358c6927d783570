"""Admission control is pure: how many of a batch a tier takes."""

from __future__ import annotations

from pipeline.core.admission import DepthCache, admitted


def test_unbounded_tier_admits_everything() -> None:
    assert admitted(10**9, 500, max_depth=0, overflow="reject") == 500


def test_accept_overflow_never_refuses() -> None:
    assert admitted(2000, 500, max_depth=1000, overflow="accept") == 500


def test_reject_overflow_admits_only_up_to_max_depth() -> None:
    assert admitted(990, 500, max_depth=1000, overflow="reject") == 10


def test_full_tier_admits_nothing_even_past_its_limit() -> None:
    assert admitted(1500, 5, max_depth=1000, overflow="reject") == 0


def test_depth_is_read_once_per_ttl_and_advanced_locally() -> None:
    reads: list[str] = []
    now = [0.0]

    def read(tier: str) -> int:
        reads.append(tier)
        return 100

    cache = DepthCache(read, ttl_s=0.5, clock=lambda: now[0])
    assert cache.depth("bulk") == 100
    cache.added("bulk", 7)
    now[0] = 0.4
    assert cache.depth("bulk") == 107
    assert reads == ["bulk"]
    now[0] = 0.6
    assert cache.depth("bulk") == 100
    assert reads == ["bulk", "bulk"]
