"""The guards around handlers on threads and gevent workers (prefork's are covered by
test_outage and test_batch): a downstream outage behind its circuit breaker, a
retry budget under a burst, and a batched tier's per-event semantics, with 16
attempts at once in one process."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.core.retry import Reason
from pipeline.core.state import Keys
from pipeline.demo import DEMO_DOWNSTREAM, calls_key, down_key, fixed_key, report
from tests.integration.support import Stack, breaker_toml, wait_for, write_config

TIERS = """
[tiers.guarded]
queue = "{pool}-guarded"
pool = "{pool}"
accept_unenforced_time_limit = true
concurrency = 16
prefetch_multiplier = 2
max_retries = 2
backoff_base_s = 0.05
backoff_max_s = 0.1
retry_budget_ratio = 0.2
retry_budget_min = 2
retry_budget_window_s = 2
soft_time_limit_s = 4
time_limit_s = 5

[tiers.packed]
queue = "{pool}-packed"
pool = "{pool}"
accept_unenforced_time_limit = true
concurrency = 16
prefetch_multiplier = 2
batch_size = 20
max_retries = 1
backoff_base_s = 0.05
backoff_max_s = 0.1
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5
"""
CONCURRENCY = 16  # attempts at once in the one worker process
OUTAGE_EVENTS = 200  # demo.flaky events sent while the downstream is down
BURST_EVENTS = 300  # demo.fail events in the retry-budget burst
BATCH_EVENTS = 1_000  # events published to the batched tier
POISONED = 5  # of them fail every time


@pytest.fixture(scope="module", params=["threads", "gevent"])
def stack(request: pytest.FixtureRequest, redis_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    pool = request.param
    tmp = tmp_path_factory.mktemp(f"guards-{pool}")
    config = write_config(tmp / "pipeline.toml", prefix=f"{pool}-",
                          extra=breaker_toml(open_s=1.5) + TIERS.format(pool=pool))
    s = Stack(redis_url, config, tmp)
    s.rt.breakers.force(DEMO_DOWNSTREAM, None)  # the other pool's run left it as it was
    try:
        s.start_workers("guarded", "packed")
        yield s
    finally:
        s.stop()


def calls(stack: Stack, name: str) -> int:
    return int(stack.state.get(calls_key(name)) or 0)


def test_an_outage_opens_the_breaker_and_defers_work_without_losing_any(
    stack: Stack,
) -> None:
    opened_before = stack.rt.breakers.status(DEMO_DOWNSTREAM)["opened_total"]
    stack.state.set(down_key(DEMO_DOWNSTREAM), "1")
    before = calls(stack, DEMO_DOWNSTREAM)
    events = [stack.publish("demo.flaky", tier="guarded", payload={"fail_rate": 0.0})
              for _ in range(OUTAGE_EVENTS)]
    wait_for(lambda: stack.rt.breakers.status(DEMO_DOWNSTREAM)["opened_total"]
             > opened_before, 10, "the breaker to open")
    time.sleep(5)  # the outage goes on: only half-open probes may call the downstream
    during = calls(stack, DEMO_DOWNSTREAM) - before
    # 5 failures open it, but 16 attempts may have passed its check at once; then a
    # probe per 1.5 s. Without it: 200 events x 3 attempts.
    assert during <= CONCURRENCY + 30, during
    assert all(stack.effects(str(e.id)) == 0 for e in events)

    stack.state.delete(down_key(DEMO_DOWNSTREAM))  # the downstream is back
    for e in events:
        stack.wait_effect(str(e.id), timeout_s=60)
    assert {stack.effects(str(e.id)) for e in events} == {1}
    dead = [r for r in stack.rt.dlq.iter_records() if r.handler == "demo.flaky"]
    assert dead == []  # the outage burned no retries into the DLQ


def test_a_burst_of_failures_is_held_to_the_retry_budget(stack: Stack) -> None:
    stack.state.delete(fixed_key("demo.fail"))
    tier = stack.rt.settings.tier("guarded")
    # The previous test's retries succeeded at its end and gave their budget charges
    # back (about 45 of them); let those leave the window so the burst starts clean.
    time.sleep(tier.retry_budget_window_s)
    before = calls(stack, "demo.fail")
    exhausted_before = stack.rt.ledger.budget_exhausted_total("guarded")
    started = time.monotonic()
    for _ in range(BURST_EVENTS):
        stack.publish("demo.fail", tier="guarded")
    wait_for(lambda: stack.rt.ledger.budget_exhausted_total("guarded") > exhausted_before,
             60, "the retry budget to refuse a retry")
    wait_for(lambda: calls(stack, "demo.fail") - before >= BURST_EVENTS, 60,
             "every first attempt")
    time.sleep(1)  # without a budget, retries (0.05-0.1 s backoff) would pile up now
    made = calls(stack, "demo.fail") - before
    # Without a budget: 300 x 3 attempts. With it: the firsts, and in each window at
    # most 20% of the firsts in it or the minimum (2), plus what was in flight when it
    # ran out. However slow the machine, the windows that passed bound the minimums.
    windows = (time.monotonic() - started) / tier.retry_budget_window_s + 1
    bound = BURST_EVENTS * (1 + tier.retry_budget_ratio) + \
        tier.retry_budget_min * windows + CONCURRENCY
    assert made <= bound, (made, bound)
    assert made < BURST_EVENTS * 3  # not every retry ran
    queue = tier.queue
    assert queue is not None  # named in the config above
    assert stack.state.zcard(Keys.retries(queue)) > 0


def test_a_batched_tier_runs_each_event_once_and_dead_letters_the_poisoned_alone(
    stack: Stack,
) -> None:
    poisoned = set(range(0, BATCH_EVENTS, BATCH_EVENTS // POISONED))
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "type": "demo.ok", "source": "tests",
         "tier": "packed", "payload": {"poison": i in poisoned}}
        for i in range(BATCH_EVENTS)]
    results = stack.rt.publisher.publish_many(events)
    assert all(r.outcome == "accepted" for r in results)
    ids = {e["id"] for e in events}
    bad_ids = {events[i]["id"] for i in poisoned}

    def healthy_done() -> bool:
        return all(stack.effects(i) for i in ids - bad_ids)

    def dead() -> list[str]:
        return [r.event_id for r in stack.rt.dlq.iter_records() if r.event_id in bad_ids]

    wait_for(healthy_done, 60, "every healthy event", 0.5)
    wait_for(lambda: set(dead()) == bad_ids, 60, "each poisoned event in the DLQ")
    assert sorted(dead()) == sorted(bad_ids)  # one record each, not one per batch
    assert {stack.effects(i) for i in ids - bad_ids} == {1}
    assert report(stack.state)["duplicate_effects"] == 0
    records = [r for r in stack.rt.dlq.iter_records() if r.event_id in bad_ids]
    assert all(r.reason is Reason.RETRIES_EXHAUSTED and r.attempts == 2 for r in records)
