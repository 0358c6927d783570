"""Concurrent single publishes are gathered into groups (pure, with threads)."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.producer.coalesce import Coalescer


def run_concurrently(coalescer: Coalescer[int, str], items: list[int]) -> list[object]:
    results: list[object] = [None] * len(items)

    def call(i: int) -> None:
        try:
            results[i] = coalescer.submit(items[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_submits_share_groups_and_each_gets_its_own_result() -> None:
    groups: list[list[int]] = []

    def flush(items: list[int]) -> list[str]:
        groups.append(items)
        return [f"ok-{i}" for i in items]

    coalescer: Coalescer[int, str] = Coalescer(flush, wait_s=0.3, max_items=10)
    results = run_concurrently(coalescer, list(range(25)))
    assert results == [f"ok-{i}" for i in range(25)]
    assert sorted(i for g in groups for i in g) == list(range(25))
    assert len(groups) <= 5  # 25 callers, groups of up to 10: not 25 round trips
    assert max(len(g) for g in groups) <= 10


def test_a_lone_submit_waits_at_most_the_wait_time() -> None:
    coalescer: Coalescer[int, str] = Coalescer(lambda items: ["x" for _ in items],
                                               wait_s=0.2, max_items=100)
    started = time.monotonic()
    assert coalescer.submit(1) == "x"
    assert 0.15 < time.monotonic() - started < 1.0


def test_a_failed_flush_raises_in_every_caller_of_the_group() -> None:
    def flush(items: list[int]) -> list[str]:
        raise ConnectionError("broker down")

    coalescer: Coalescer[int, str] = Coalescer(flush, wait_s=0.2, max_items=50)
    results = run_concurrently(coalescer, list(range(8)))
    assert all(isinstance(r, ConnectionError) for r in results)
    with pytest.raises(ConnectionError):
        coalescer.submit(9)
