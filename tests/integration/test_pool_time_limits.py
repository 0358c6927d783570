"""What bounds a handler's time on a tier that accepted an unenforced hard limit
(``accept_unenforced_time_limit``), with real ``threads`` and ``gevent`` workers, and
that its event is settled once all the same: never lost, never run twice.

* threads: nothing. A synchronous handler runs past ``time_limit_s`` to its end and
  is settled then; a restored delivery of its try meanwhile is rechecked, not run.
* gevent: the hard limit, raised at the handler's next wait; the attempt is settled
  as failed (``TimeLimitExceeded``), retried, then dead-lettered with its context.
* async handlers, on both: cancelled at ``soft_time_limit_s``
  (``tests/integration/test_pools.py``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pipeline.core.retry import Reason
from pipeline.core.state import Keys
from pipeline.messages.taskids import task_id_for
from pipeline.worker.trystate import RECHECK_MARGIN_S
from tests.integration.support import IO_MODULES, Stack, wait_for, write_config
from tests.integration.test_pools import IO_TIER

CONCURRENCY = 8
SOFT_S, HARD_S = 2.0, 3.0  # IO_TIER's soft_time_limit_s and time_limit_s


@contextmanager
def io_stack(pool: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[Stack]:
    """One ``io`` tier worker on ``pool``, with the io handlers loaded."""
    tmp = tmp_path_factory.mktemp(f"limits-{pool}")
    prefix = f"limits-{pool}-"
    config = write_config(tmp / "pipeline.toml", prefix=prefix, extra=IO_TIER.format(
        prefix=prefix, pool=pool, concurrency=CONCURRENCY),
        handler_modules=IO_MODULES)
    s = Stack(redis_url, config, tmp)
    try:
        s.start_worker("io")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def threads_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
                  ) -> Iterator[Stack]:
    with io_stack("threads", redis_url, tmp_path_factory) as s:
        yield s


@pytest.fixture(scope="module")
def gevent_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory,
                 ) -> Iterator[Stack]:
    with io_stack("gevent", redis_url, tmp_path_factory) as s:
        yield s


def io_log(stack: Stack) -> str:
    return "".join(w.log() for w in stack.workers if w.tier == "io")


def test_a_threads_worker_lets_a_sync_handler_run_past_its_hard_limit_and_settles_it_once(
    threads_stack: Stack,
) -> None:
    stack = threads_stack
    sent_at = time.monotonic()
    result = stack.publish("io.sleep", tier="io", payload={"s": HARD_S + 1.5})
    event_id = str(result.id)
    stack.wait_effect(f"{event_id}:finished", timeout_s=20)
    assert time.monotonic() - sent_at >= HARD_S + 1.5  # nothing cut it short
    assert stack.state.exists(Keys.done(result.task_ids[0]))
    time.sleep(1.0)  # time for a retry or a second run, were there one
    assert stack.effects(f"{event_id}:started") == 1
    assert stack.effects(event_id) == 1
    assert stack.dlq_for(event_id) == []
    assert "Hard time limit" not in io_log(stack)


def test_a_gevent_worker_ends_a_waiting_sync_handler_at_its_hard_limit_then_dead_letters_it(
    gevent_stack: Stack,
) -> None:
    stack = gevent_stack
    sent_at = time.monotonic()
    result = stack.publish("io.sleep", tier="io", payload={"s": 60})
    event_id = str(result.id)
    record = stack.wait_dlq(event_id, timeout_s=30)
    took_s = time.monotonic() - sent_at
    assert 2 * HARD_S <= took_s < 2 * HARD_S + 10  # two attempts, each ended at the limit
    assert record.reason is Reason.RETRIES_EXHAUSTED
    assert record.attempts == 2  # io: max_retries = 1
    assert record.exception.endswith("TimeLimitExceeded")
    assert record.event["id"] == event_id
    assert record.event["payload"] == {"s": 60}
    assert record.task_id == result.task_ids[0]
    time.sleep(1.0)  # the requeued messages: acknowledged, not run again
    assert stack.effects(f"{event_id}:started") == 2  # each attempt ran once
    assert stack.effects(f"{event_id}:finished") == 0
    assert len(stack.dlq_for(event_id)) == 1
    limit_hit = f"Hard time limit ({HARD_S}s) exceeded for pipeline.handle[io.sleep]"
    assert io_log(stack).count(f"{limit_hit}[{result.task_ids[0]}]") == 2


def test_a_restored_delivery_of_a_try_running_here_past_its_hard_limit_is_not_run_again(
    threads_stack: Stack,
) -> None:
    """A message restored (a connection loss, say) while its handler still runs in this
    process past ``time_limit_s`` + the recheck margin: the second delivery finds the
    try's running mark old enough to be judged lost; it must see that a thread of its
    own process runs it, and wait instead of running it again."""
    stack = threads_stack
    run_s = HARD_S + RECHECK_MARGIN_S + 2.5
    event: dict[str, Any] = {"id": str(uuid.uuid4()), "type": "io.sleep", "source": "tests",
                             "payload": {"s": run_s}}
    publisher = stack.rt.publisher
    spec = stack.rt.messages.spec(event, handler="io.sleep", tier="io",
                                  task_id=task_id_for(event["id"], "io.sleep"), attempt=1)
    assert publisher._renderer is not None  # a Redis broker
    key, payload = publisher._renderer.render(spec)
    stack.state.lpush(key, payload)  # the first delivery
    stack.wait_effect(f"{event['id']}:started", timeout_s=10)
    started_at = time.monotonic()
    time.sleep(HARD_S + RECHECK_MARGIN_S + 1.0)  # past what any delivery may run
    stack.state.lpush(key, payload)  # the same try, delivered again while it runs
    stack.wait_effect(event["id"], timeout_s=20)
    assert time.monotonic() - started_at >= run_s - 0.5
    time.sleep(1.5)  # a second run would have started by now
    assert stack.effects(f"{event['id']}:started") == 1
    assert "is running elsewhere; checking again" in io_log(stack)
    wait_for(lambda: "already succeeded" in io_log(stack), 20,
             "the recheck to find the done mark")
    assert stack.effects(event["id"]) == 1
    assert stack.dlq_for(event["id"]) == []
