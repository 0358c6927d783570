"""Never lost, never twice: real workers reach the broker through a proxy that resets
their connections, get SIGKILLed, hit hard time limits while the settle step fails.

Every check counts handler runs on the broker directly (``fault_handlers``), so the
faults done to the workers' own connections cannot hide a lost or repeated run.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest

from pipeline.core.retry import Reason
from pipeline.worker.batchledger import _BEGIN_FIRSTS_LUA, _START_NOTED_LUA
from pipeline.worker.inflight import CONSUMERS_KEY
from pipeline.worker.ledger import SETTLE_LUA
from tests.integration import fault_handlers
from tests.integration.faults import ResetProxy
from tests.integration.support import Stack, wait_for

FAULT_TOML = """
handler_modules = ["tests.integration.fault_handlers"]
default_tier = "standard"
retry_poll_interval_s = 0.1

[tiers.critical]
queue = "{p}critical"
concurrency = 1
prefetch_multiplier = 4
max_retries = 3
backoff_base_s = 0.1
backoff_max_s = 0.3
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5

[tiers.standard]
queue = "{p}standard"
concurrency = 2
prefetch_multiplier = 4
max_retries = 3
backoff_base_s = 0.1
backoff_max_s = 0.3
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5
lost_after_s = 4

[tiers.batched]
queue = "{p}batched"
concurrency = 1
prefetch_multiplier = 1
batch_size = 50
max_retries = 2
backoff_base_s = 0.1
backoff_max_s = 0.2
retry_budget_ratio = 0
soft_time_limit_s = 4
time_limit_s = 5

[tiers.slow]
queue = "{p}slow"
concurrency = 1
prefetch_multiplier = 1
max_retries = 1
backoff_base_s = 0.1
backoff_max_s = 0.2
retry_budget_ratio = 0
soft_time_limit_s = 0.5
time_limit_s = 1.5

[tiers.slowbatch]
queue = "{p}slowbatch"
concurrency = 1
prefetch_multiplier = 1
batch_size = 3
max_retries = 1
backoff_base_s = 0.1
backoff_max_s = 0.2
retry_budget_ratio = 0
soft_time_limit_s = 0.5
time_limit_s = 1.5
"""

SETTLE_SHA = hashlib.sha1(SETTLE_LUA.encode()).hexdigest().encode()  # EVALSHA of a settle
# what marks each of a batch's ledger calls on the wire: its script's EVALSHA, and for
# a settle that starts the next try the plain commands it goes out as (SET ... XX)
LEDGER_CALLS = {**{name: hashlib.sha1(lua.encode()).hexdigest().encode()
                   for name, lua in {"begin": _BEGIN_FIRSTS_LUA,
                                     "start": _START_NOTED_LUA}.items()},
                "settle": b"\r\n$2\r\nXX\r\n"}


@pytest.fixture(scope="module")
def proxy(redis_url: str) -> Iterator[ResetProxy]:
    p = ResetProxy.before(redis_url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, proxy: ResetProxy,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("fetch")
    prefix = f"f{uuid.uuid4().hex[:6]}-"
    config = tmp / "pipeline.toml"
    config.write_text(FAULT_TOML.format(p=prefix))
    db = int(redis_url.rsplit("/", 1)[1])
    s = Stack(redis_url, config, tmp, env_extra={
        "PIPELINE_BROKER_URL": proxy.url(db), "FAULT_EFFECTS_URL": redis_url})
    os.environ["FAULT_EFFECTS_URL"] = redis_url  # the test process reads effects too
    try:
        yield s
    finally:
        s.stop()


def _send(stack: Stack, tier: str, n: int, **payload: Any) -> list[str]:
    events = [{"id": str(uuid.uuid4()), "type": "fault.record", "source": "faults",
               "tier": tier, "payload": payload} for _ in range(n)]
    results = stack.rt.publisher.publish_many(events)
    return [cast(str, r.id) for r in results if r.outcome == "accepted"]  # accepted: an id


def _runs(event_id: str) -> int:
    return int(fault_handlers.effects().llen(fault_handlers.runs_key(event_id)))


def _starts(event_id: str) -> int:
    return int(fault_handlers.effects().llen(fault_handlers.starts_key(event_id)))


def _dead(stack: Stack) -> set[str]:
    return {r.event_id for r in stack.rt.dlq.iter_records()}


def test_connection_resets_between_workers_and_broker_lose_and_duplicate_nothing(
    stack: Stack, proxy: ResetProxy,
) -> None:
    workers = stack.start_workers("critical", "standard")
    chaos = proxy.chaos(20, min_s=0.3, max_s=1.5)
    accepted: list[str] = []
    for _ in range(20):  # 2,000 events over ~10 s, while connections are reset
        accepted += _send(stack, "critical", 50) + _send(stack, "standard", 50)
        time.sleep(0.5)
    chaos.join()
    assert proxy.resets > 10
    assert stack.state.zcard(CONSUMERS_KEY) >= 2  # both workers fetch through pipeline.worker.fetch

    def settled() -> bool:
        dead = _dead(stack)
        return all(_runs(i) >= 1 or i in dead for i in accepted)

    wait_for(settled, 120, "every accepted event handled or dead-lettered", 0.5)
    time.sleep(6)  # anything restored late would run again by now
    dead = _dead(stack)
    assert [i for i in accepted if _runs(i) > 1] == []  # no duplicate effects
    assert sum(1 for i in accepted if _runs(i) == 1) + len(dead & set(accepted)) == len(accepted)
    for worker in workers:
        worker.stop()


def test_sigkilled_worker_prefetched_critical_work_runs_again_within_the_bound(
    stack: Stack,
) -> None:
    victim = stack.start_worker("critical")
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "type": "fault.sleep", "source": "faults",
         "tier": "critical", "payload": {"s": 1.0}} for _ in range(5)]
    assert all(r.outcome == "accepted" for r in stack.rt.publisher.publish_many(events))
    ids = [e["id"] for e in events]
    wait_for(lambda: _starts(ids[0]) == 1, 20, "the first event to start")
    os.kill(victim.process.pid, signal.SIGKILL)  # the main process only: a node's OOM kill
    killed_at = time.monotonic()
    victim.process.wait()
    survivor = stack.start_worker("critical")
    wait_for(lambda: all(_runs(i) == 1 for i in ids), 60, "all five events handled")
    took_s = time.monotonic() - killed_at
    print(f"prefetched critical work handled {took_s:.1f}s after the SIGKILL")
    assert took_s <= 30, f"prefetched work came back after {took_s:.1f}s"
    assert [_runs(i) for i in ids] == [1] * 5
    survivor.stop()
    for child in victim.child_pids():
        os.kill(child, signal.SIGKILL)


def test_worker_child_killed_mid_batch_leaves_no_duplicate_effect(stack: Stack) -> None:
    worker = stack.start_worker("batched")
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "type": "fault.record", "source": "faults",
         "tier": "batched", "payload": {"crash_once": i == 39}} for i in range(50)]
    assert all(r.outcome == "accepted" for r in stack.rt.publisher.publish_many(events))
    ids = [e["id"] for e in events]
    wait_for(lambda: all(_runs(i) == 1 for i in ids), 60, "all 50 events handled")
    time.sleep(2)
    assert [_runs(i) for i in ids] == [1] * 50
    assert _starts(ids[39]) == 2  # the crash, then its retry: nothing else ran twice
    assert all(_starts(i) == 1 for i in ids[:39] + ids[40:])
    worker.stop()


@pytest.mark.parametrize("call", ["begin", "start", "settle"])
@pytest.mark.parametrize("reply_lost", [False, True])
def test_a_reset_on_any_ledger_call_of_a_batch_runs_each_event_once(
    stack: Stack, proxy: ResetProxy, call: str, reply_lost: bool,
) -> None:
    worker = stack.start_worker("batched")  # batches of 50, starts and settles streamed
    time.sleep(0.5)
    resets = proxy.resets
    proxy.drop_on(LEDGER_CALLS[call], times=1, after_forward=reply_lost)
    ids = _send(stack, "batched", 50)
    assert len(ids) == 50
    wait_for(lambda: all(_runs(i) == 1 for i in ids), 60, "all 50 events handled")
    time.sleep(2)  # a repeated run would show by now
    assert [_runs(i) for i in ids] == [1] * 50
    assert [_starts(i) for i in ids] == [1] * 50
    assert proxy.resets > resets, f"no {call} call was cut off"
    worker.stop()


@pytest.mark.parametrize("tier", ["slow", "slowbatch"])
@pytest.mark.parametrize("reply_lost", [False, True])
def test_hard_time_limit_with_the_settle_failing_once_runs_each_attempt_once(
    stack: Stack, proxy: ResetProxy, tier: str, reply_lost: bool,
) -> None:
    worker = stack.start_worker(tier)
    event_id = str(uuid.uuid4())
    event = {"id": event_id, "type": "fault.sleep", "source": "faults", "tier": tier,
             "payload": {"s": 3.0}}
    proxy.drop_on(SETTLE_SHA, times=1, after_forward=reply_lost)
    assert stack.rt.publisher.publish_many([event])[0].outcome == "accepted"
    record = stack.wait_dlq(event_id, timeout_s=40)
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 2
    assert record.exception.endswith("TimeLimitExceeded")
    time.sleep(3)
    assert _starts(event_id) == 2  # attempt 1 and attempt 2, each once
    assert _runs(event_id) == 0
    assert len(stack.dlq_for(event_id)) == 1
    worker.stop()


@pytest.mark.parametrize("reply_lost", [False, True])
def test_fetch_cut_off_by_a_reset_neither_loses_nor_repeats_the_message(
    stack: Stack, proxy: ResetProxy, reply_lost: bool,
) -> None:
    worker = stack.start_worker("standard")  # lost_after_s = 4
    time.sleep(0.5)
    proxy.drop_on(b"cjson.decode(item)", times=1, after_forward=reply_lost)
    (event_id,) = _send(stack, "standard", 1)
    wait_for(lambda: _runs(event_id) == 1, 30, "the event to be handled")
    time.sleep(5)  # past lost_after_s: a second copy would have run by now
    assert _runs(event_id) == 1
    worker.stop()


def test_hard_time_limit_mid_batch_settles_the_running_event_and_runs_the_rest_once(
    stack: Stack,
) -> None:
    worker = stack.start_worker("slowbatch")  # batch of 3, hard limit 1.5 s for all of it
    events: list[dict[str, Any]] = [
        {"id": str(uuid.uuid4()), "type": "fault.sleep", "source": "faults",
         "tier": "slowbatch", "payload": {"s": s}} for s in (0.1, 3.0, 0.1)]
    assert all(r.outcome == "accepted" for r in stack.rt.publisher.publish_many(events))
    first, stuck, last = (e["id"] for e in events)
    record = stack.wait_dlq(stuck, timeout_s=40)
    wait_for(lambda: _runs(last) == 1, 20, "the event after the stuck one")
    time.sleep(3)
    assert (_starts(first), _runs(first)) == (1, 1)  # done before the limit: not re-run
    assert (_starts(last), _runs(last)) == (1, 1)  # never began: ran on the redelivery
    assert (_starts(stuck), _runs(stuck)) == (2, 0)  # attempt 1 in the batch, attempt 2
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.exception.endswith("TimeLimitExceeded")
    worker.stop()
