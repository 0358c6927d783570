"""After an outage, the work a breaker deferred runs as soon as the breaker closes,
not when its (growing, jittered) deferral would have ended. Real workers."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from pipeline.core.state import Keys
from pipeline.demo import DEMO_DOWNSTREAM, down_key
from tests.integration.support import Stack, breaker_toml, wait_for, write_config

OPEN_S = 5.0  # the breaker's cool-down: deferrals spread over up to 4x this
BREAKER = breaker_toml(OPEN_S)
EVENTS = 100  # demo.flaky events sent while the downstream is down
OUTAGE_S = 8.0  # how long it stays down after they are sent
AFTER_CLOSE_S = 8.0  # every event done this soon after the breaker closes (spread: 20 s)
_RELEASED = re.compile(r"breaker demo-api closed: (\d+) deferred tasks are due now")


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("recovery")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml", extra=BREAKER), tmp)
    try:
        s.start_worker("standard")
        yield s
    finally:
        s.stop()


def test_deferred_work_runs_once_the_breaker_closes_not_when_its_deferral_ends(
    stack: Stack,
) -> None:
    (worker,) = stack.workers
    stack.state.set(down_key(DEMO_DOWNSTREAM), "1")
    events = [stack.publish("demo.flaky", payload={"fail_rate": 0.0}) for _ in range(EVENTS)]
    wait_for(lambda: stack.rt.breakers.status(DEMO_DOWNSTREAM)["opened_total"] >= 1, 10,
             "the breaker to open")
    time.sleep(OUTAGE_S)
    held = stack.state.zcard(Keys.breaker_holds(DEMO_DOWNSTREAM))
    assert held > EVENTS / 2  # deferred and noted as held by the breaker
    stack.state.delete(down_key(DEMO_DOWNSTREAM))  # the downstream is back

    found = wait_for(lambda: _RELEASED.search(worker.log()), 4 * OPEN_S + 10,
                     "the breaker to close and release its deferred work")
    closed_at = time.monotonic()
    assert int(found.group(1)) > 0
    pending = [e for e in events if not stack.effects(str(e.id))]
    assert len(pending) > EVENTS / 4, "most work should still have been deferred"
    for e in pending:
        left_s = AFTER_CLOSE_S - (time.monotonic() - closed_at)
        stack.wait_effect(str(e.id), timeout_s=max(left_s, 0.1))
    assert {stack.effects(str(e.id)) for e in events} == {1}
    assert [r for r in stack.rt.dlq.iter_records() if r.handler == "demo.flaky"] == []
