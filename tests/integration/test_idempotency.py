"""Idempotency end to end, and admission control under a bulk flood."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.messages.task import redis_list_key
from pipeline.worker.runtime import runtime_for
from tests.integration.support import Stack, wait_for, write_config

WINDOW_S = 60  # idempotency window of this module's workers

BOUNDED_BULK = """
[tiers.flood]
concurrency = 1
max_depth = 200
overflow = "reject"
soft_time_limit_s = 4
time_limit_s = 5
"""


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("idem")
    config = write_config(tmp / "pipeline.toml", extra=BOUNDED_BULK)
    config.write_text(f"idempotency_window_s = {WINDOW_S}\nadmission_cache_s = 0.2\n"
                      + config.read_text())
    s = Stack(redis_url, config, tmp)
    try:
        s.start_workers("critical", "standard")
        yield s
    finally:
        s.stop()


def test_same_id_within_the_window_is_a_duplicate_and_runs_once(stack: Stack) -> None:
    event_id = str(uuid.uuid4())
    first = stack.publish("demo.ok", id=event_id)
    second = stack.publish("demo.ok", id=event_id)
    assert (first.outcome, second.outcome) == ("accepted", "duplicate")
    stack.wait_effect(event_id)
    time.sleep(0.5)
    assert stack.effects(event_id) == 1


def test_same_idempotency_key_with_another_id_is_a_duplicate(stack: Stack) -> None:
    key = f"order-{uuid.uuid4()}"
    first = stack.publish("demo.ok", idempotency_key=key)
    second = stack.publish("demo.ok", idempotency_key=key)
    assert first.id != second.id
    assert second.outcome == "duplicate"


def test_same_idempotency_key_from_another_source_is_another_event(stack: Stack) -> None:
    key = f"order-{uuid.uuid4()}"
    shop = stack.publish("demo.ok", source="shop", idempotency_key=key)
    games = stack.publish("demo.ok", source="games", idempotency_key=key)
    again = stack.publish("demo.ok", source="games", idempotency_key=key)
    assert (shop.outcome, games.outcome, again.outcome) == ("accepted", "accepted", "duplicate")
    assert shop.id is not None
    assert games.id is not None
    stack.wait_effect(shop.id)
    stack.wait_effect(games.id)


def test_same_event_id_from_two_sources_is_handled_once_for_each(stack: Stack) -> None:
    event_id = str(uuid.uuid4())
    shop = stack.publish("demo.ok", source="shop", id=event_id)
    games = stack.publish("demo.ok", source="games", id=event_id)
    again = stack.publish("demo.ok", source="games", id=event_id)
    assert (shop.outcome, games.outcome, again.outcome) == ("accepted", "accepted", "duplicate")
    assert set(shop.task_ids).isdisjoint(games.task_ids)  # two tasks, two done marks
    wait_for(lambda: stack.effects(event_id) >= 2, 20, "both sources' events handled")
    time.sleep(0.5)
    assert stack.effects(event_id) == 2


def test_global_idempotency_scope_shares_keys_across_sources(stack: Stack) -> None:
    settings = load_settings(stack.config_path, broker_url=stack.url,
                             idempotency_scope="global")
    publisher = runtime_for(create_app(settings, main="global-keys")).publisher
    key = f"order-{uuid.uuid4()}"
    outcomes = [r.outcome for r in publisher.publish_many([
        {"type": "demo.ok", "source": "shop", "idempotency_key": key},
        {"type": "demo.ok", "source": "games", "idempotency_key": key}])]
    assert outcomes == ["accepted", "duplicate"]


@pytest.mark.parametrize("scope", ["source", "global"])
def test_batched_tiers_claim_keys_in_the_same_scope(stack: Stack, scope: str) -> None:
    settings = load_settings(stack.config_path, broker_url=stack.url, idempotency_scope=scope,
                             tiers={"packed": {"batch_size": 10, "queue": f"packed-{scope}",
                                               "time_limit_s": 5, "soft_time_limit_s": 4,
                                               "prefetch_multiplier": 1}})
    publisher = runtime_for(create_app(settings, main=f"packed-{scope}")).publisher
    key = f"order-{uuid.uuid4()}"
    events = [{"type": "demo.ok", "source": source, "idempotency_key": key, "tier": "packed"}
              for source in ("shop", "games", "games")]
    outcomes = [r.outcome for r in publisher.publish_many(events)]
    expected = {"source": ["accepted", "accepted", "duplicate"],
                "global": ["accepted", "duplicate", "duplicate"]}
    assert outcomes == expected[scope]
    stack.state.delete(*[redis_list_key(f"packed-{scope}", p) for p in range(10)])


def test_same_id_after_the_window_is_accepted_again(stack: Stack) -> None:
    settings = load_settings(stack.config_path, broker_url=stack.url, idempotency_window_s=1)
    publisher = runtime_for(create_app(settings, main="short-window")).publisher
    event = {"id": str(uuid.uuid4()), "type": "demo.ok", "source": "tests"}
    assert publisher.publish(event).outcome == "accepted"
    assert publisher.publish(event).outcome == "duplicate"
    time.sleep(1.5)
    assert publisher.publish(event).outcome == "accepted"


def test_worker_killed_after_handler_success_before_ack_does_not_rerun_it(
    stack: Stack,
) -> None:
    result = stack.publish("demo.ok", payload={"crash_once_after_success": True})
    assert result.id is not None
    stack.wait_effect(result.id)
    (standard,) = [w for w in stack.workers if w.tier == "standard"]
    skipped = f"event {result.id} handler demo.ok already succeeded"
    started = time.monotonic()
    wait_for(lambda: skipped in standard.log(), 60, "the redelivery to find the done mark")
    print(f"redelivered after {time.monotonic() - started:.2f}s")
    assert "exitcode 14" in standard.log()  # the child really died before the ack
    assert stack.effects(result.id) == 1
    assert stack.dlq_for(str(result.id)) == []


def test_failed_handler_is_still_retried_despite_the_ingest_record(stack: Stack) -> None:
    result = stack.publish("demo.retry_after", payload={"delay_s": 0.2, "fail_times": 2})
    assert result.id is not None
    stack.wait_effect(result.id)
    assert stack.effects(result.id) == 1


def test_bulk_flood_past_max_depth_is_refused_while_critical_flows(stack: Stack) -> None:
    flood = stack.rt.publisher.publish_many(
        [{"type": "demo.ok", "source": "flooder", "tier": "flood"} for _ in range(1000)])
    outcomes = [r.outcome for r in flood]
    assert outcomes.count("accepted") == 200
    assert outcomes.count("rejected") == 800
    assert {r.reason for r in flood if r.outcome == "rejected"} == {"tier_full"}
    assert stack.state.llen("flood") == 200

    started = time.monotonic()
    critical = stack.publish("demo.ok", source="vip-flood")
    assert critical.outcome == "accepted"
    assert critical.id is not None
    stack.wait_effect(critical.id, timeout_s=5)
    assert time.monotonic() - started < 1.0
    stack.state.delete("flood")
