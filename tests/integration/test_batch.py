"""A batched tier: 10,000 events, a few poisoned, per-event semantics kept."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from pipeline.core.retry import Reason
from pipeline.demo import report
from tests.integration.support import Stack, wait_for, write_config

EVENTS = 10_000  # events published to the batched tier
POISONED = 7  # of them fail every time

BATCHED = """
[tiers.batched]
concurrency = 2
prefetch_multiplier = 2
batch_size = 100
max_retries = 1
backoff_base_s = 0.05
backoff_max_s = 0.1
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5
"""


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("batch")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml", extra=BATCHED), tmp)
    try:
        s.start_worker("batched")
        yield s
    finally:
        s.stop()


def test_poisoned_events_alone_reach_the_dlq_and_the_rest_run_once(stack: Stack) -> None:
    poisoned = set(range(0, EVENTS, EVENTS // POISONED))
    events = [{"id": str(uuid.uuid4()), "type": "demo.ok", "source": "batch-test",
               "tier": "batched", "payload": {"poison": i in poisoned}} for i in range(EVENTS)]
    results = stack.rt.publisher.publish_many(events)
    assert all(r.outcome == "accepted" for r in results)
    assert stack.state.llen("batched") <= EVENTS // 100 + len(poisoned)  # packed, not 1 per event
    bad_ids = {events[i]["id"] for i in poisoned}

    def dead() -> set[str]:
        return {r.event_id for r in stack.rt.dlq.iter_records() if r.event_id in bad_ids}

    wait_for(lambda: report(stack.state)["processed"] >= EVENTS - len(poisoned), 120,
             "the healthy events", 0.5)
    wait_for(lambda: dead() == bad_ids, 60, "each poisoned event in the DLQ")
    final = report(stack.state, with_ids=True)
    assert final["duplicate_effects"] == 0
    assert set(final["ids"]) == {e["id"] for e in events} - bad_ids
    records = [r for r in stack.rt.dlq.iter_records() if r.event_id in bad_ids]
    assert len(records) == len(bad_ids)  # one record each, not one per batch
    assert all(r.reason is Reason.RETRIES_EXHAUSTED and r.attempts == 2 for r in records)


def test_duplicates_are_left_out_of_a_batch(stack: Stack) -> None:
    first = {"id": str(uuid.uuid4()), "type": "demo.ok", "source": "dup", "tier": "batched"}
    again = [first, {"id": str(uuid.uuid4()), "type": "demo.ok", "source": "dup",
                     "tier": "batched"}]
    assert stack.rt.publisher.publish(first).outcome == "accepted"
    outcomes = [r.outcome for r in stack.rt.publisher.publish_many(again)]
    assert outcomes == ["duplicate", "accepted"]
    stack.wait_effect(again[1]["id"])
    assert stack.effects(first["id"]) == 1


def test_concurrent_single_publishes_wait_to_share_batch_messages(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import threading

    from pipeline.app import create_app
    from pipeline.config.load import load_settings
    from pipeline.worker.runtime import runtime_for

    tmp = tmp_path_factory.mktemp("coalesce")
    config = write_config(tmp / "pipeline.toml", prefix="co-",
                          extra=BATCHED.replace("[tiers.batched]", "[tiers.waiting]")
                          .replace("batch_size = 100", "batch_size = 50\nbatch_wait_ms = 300"))
    settings = load_settings(config, broker_url=redis_url)
    publisher = runtime_for(create_app(settings, main="coalesce")).publisher
    outcomes: list[str] = []
    threads = [threading.Thread(target=lambda: outcomes.append(publisher.publish(
        {"type": "demo.ok", "source": "api", "tier": "waiting"}).outcome)) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert outcomes == ["accepted"] * 40
    assert 1 <= stack_len(redis_url, "waiting") <= 4  # 40 requests, a handful of messages


def stack_len(url: str, key: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return int(client.llen(key))
    finally:
        client.delete(key)
        client.close()


def test_the_same_id_from_two_sources_in_one_batch_is_two_tasks(stack: Stack) -> None:
    event_id = str(uuid.uuid4())
    shop, games = stack.rt.publisher.publish_many([
        {"id": event_id, "type": "demo.ok", "source": "shop", "tier": "batched",
         "payload": {"poison": True}},
        {"id": event_id, "type": "demo.ok", "source": "games", "tier": "batched"}])
    assert (shop.outcome, games.outcome) == ("accepted", "accepted")
    record = stack.wait_dlq(event_id, 60)
    assert record.task_id == shop.task_ids[0] != games.task_ids[0]  # worker and publisher agree
    assert stack.wait_effect(event_id) == 1  # the other source's event ran, once
