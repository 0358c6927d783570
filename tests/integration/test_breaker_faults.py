"""Faults around the steps that carry the circuit breakers. Connection resets of a
try's gated begin, its recorded settle, and a breaker's release of the work it
held: real workers reach Redis through a proxy that resets the connection that
sends a given script, before the script runs or after it ran (its reply lost).
And a half-open probe killed by its hard time limit: the worker's main process
settles the try and records the failed call in one script."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.state import Keys
from pipeline.demo import DEMO_DOWNSTREAM, calls_key
from pipeline.worker import schedule as schedule_module
from pipeline.worker.ledgerscripts import BEGIN_GATED_LUA, SETTLE_RECORDED_LUA
from pipeline.worker.schedule import RELEASE_CHUNK, RetrySchedule
from tests.integration.faults import ResetProxy
from tests.integration.support import IO_MODULES, Stack, breaker_toml, wait_for, write_config

EVENTS = 60  # demo.flaky events (fail_rate 0) behind the demo-api breaker
RESETS = 4  # connections reset on each script, half before and half after it ran
HELD = RELEASE_CHUNK * 2 + 7  # entries a release moves, in three chunks


def sha(lua: str) -> bytes:
    return hashlib.sha1(lua.encode()).hexdigest().encode()  # what EVALSHA sends


@pytest.fixture(scope="module")
def proxy(redis_url: str) -> Iterator[ResetProxy]:
    p = ResetProxy.before(redis_url)
    yield p
    p.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, proxy: ResetProxy,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("breaker-faults")
    db = int(redis_url.rsplit("/", 1)[1])
    s = Stack(redis_url, write_config(tmp / "pipeline.toml", extra=breaker_toml(open_s=5)),
              tmp, env_extra={"PIPELINE_BROKER_URL": proxy.url(db)})
    try:
        s.start_worker("standard")
        yield s
    finally:
        s.stop()


def window_calls(client: redis.Redis, name: str) -> int:
    """The calls ``name``'s breaker counted in its window."""
    return sum(int(client.hget(key, "calls") or 0)
               for key in client.scan_iter(f"{Keys.breaker(name)}:w:*"))


def test_resets_around_the_gated_begin_and_recorded_settle_lose_and_double_nothing(
    stack: Stack, proxy: ResetProxy,
) -> None:
    for marker in (sha(BEGIN_GATED_LUA), sha(SETTLE_RECORDED_LUA)):
        proxy.drop_on(marker, times=RESETS // 2)
        proxy.drop_on(marker, times=RESETS // 2, after_forward=True)
    resets_before = proxy.resets
    events = [stack.publish("demo.flaky", payload={"fail_rate": 0.0}) for _ in range(EVENTS)]
    for e in events:
        stack.wait_effect(str(e.id), timeout_s=60)
    assert proxy.resets - resets_before >= 2 * RESETS  # every planned reset happened
    assert {stack.effects(str(e.id)) for e in events} == {1}  # each ran once
    assert int(stack.state.get(calls_key(DEMO_DOWNSTREAM)) or 0) == EVENTS
    # each call counted once by the breaker: a settle re-sent after its reply was
    # lost found the try settled and recorded nothing again
    assert window_calls(stack.state, DEMO_DOWNSTREAM) == EVENTS
    assert stack.rt.breakers.status(DEMO_DOWNSTREAM)["state"] == "closed"
    assert stack.state.zcard(Keys.breaker_probes(DEMO_DOWNSTREAM)) == 0


@pytest.mark.parametrize("after_forward", [False, True], ids=["before-it-ran", "reply-lost"])
def test_a_release_cut_by_resets_still_makes_every_held_entry_due_once(
    redis_url: str, proxy: ResetProxy, after_forward: bool,
) -> None:
    db = int(redis_url.rsplit("/", 1)[1])
    direct = redis.Redis.from_url(redis_url)
    through_proxy = redis.Redis.from_url(proxy.url(db))  # redis-py retries a reset command
    app = create_app(load_settings(None, broker_url=redis_url), main="release-faults")
    writer = RetrySchedule(app, direct, atomic_move=True)
    releaser = RetrySchedule(app, through_proxy, atomic_move=True)
    downstream = f"api-{uuid.uuid4().hex[:6]}"
    key = Keys.retries(f"q-{downstream}")
    direct.hset(Keys.breaker(downstream), "state", "open")
    later = time.time() + 3600
    for i in range(HELD):
        member = f"m{i}".encode()
        direct.zadd(key, {member: later})
        writer.hold(downstream, f"t{i}", (key, member), time.time() - i)
    direct.hset(Keys.breaker(downstream), "state", "closed")
    proxy.drop_on(sha(schedule_module._RELEASE_LUA), times=2, after_forward=after_forward)
    resets_before = proxy.resets
    now = time.time()
    releaser.release(downstream, now=now)
    assert proxy.resets - resets_before == 2
    assert direct.zcard(key) == HELD  # one entry per task, none added or lost
    assert direct.zcount(key, "-inf", now) == HELD  # every one due now
    assert direct.zcard(Keys.breaker_holds(downstream)) == 0
    direct.close()
    through_proxy.close()


def test_a_probe_killed_by_its_hard_time_limit_fails_and_gives_its_slot_back(
    redis_url: str, tmp_path: Path,
) -> None:
    config = write_config(tmp_path / "pipeline.toml", prefix="htl-", soft=0.5, hard=1.5,
                          handler_modules=IO_MODULES,
                          extra=breaker_toml(open_s=30, name="sleep-api"))
    stack = Stack(redis_url, config, tmp_path)
    breaker = Keys.breaker("sleep-api")
    stack.state.delete(breaker, Keys.breaker_probes("sleep-api"))
    stack.state.hset(breaker, mapping={"state": "open", "opened_at": 0})  # cooled down
    try:
        stack.start_worker("standard")
        result = stack.publish("io.guarded_sleep", payload={"s": 5})  # past the hard limit
        # the probe took the one slot; the hard limit kills its child at 1.5 s and the
        # main process settles the try as failed, recording the call in the same script
        wait_for(lambda: stack.rt.breakers.status("sleep-api")["opened_total"] >= 1, 20,
                 "the failed probe to reopen the breaker")
        status = stack.rt.breakers.status("sleep-api")
        assert status["state"] == "open"
        assert status["probes_leased"] == 0  # its lease went with the record
        assert result.id is not None
        assert stack.effects(str(result.id)) == 0
        key = Keys.retries(stack.rt.settings.queue_for("standard"))
        # attempt 2 is scheduled: not lost, not dead-lettered. It is due after the
        # backoff (0.1 s), moved to the queue, and deferred there by the open breaker
        # back onto the schedule: between those steps the schedule is empty a moment.
        retries = wait_for(lambda: cast(list[bytes], stack.state.zrange(key, 0, -1)), 20,
                           "attempt 2 on the retry schedule")
        assert len(retries) == 1
        message = json.loads(retries[0].split(b"\n", 1)[1])  # "<list>\n<kombu message>"
        _, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs["attempt"] == 2
    finally:
        stack.stop()


def test_a_probe_whose_settle_reply_is_lost_still_releases_the_held_work(
    stack: Stack, proxy: ResetProxy,
) -> None:
    """The probe's settle closes the breaker but its reply is lost: the re-sent settle
    finds the try settled and reports no transition; the worker sees the breaker
    closed and releases the held work anyway (before: it waited out its own delay)."""
    state = stack.state
    key = Keys.retries(f"q-held-{uuid.uuid4().hex[:6]}")  # no worker moves it
    holder = RetrySchedule(stack.rt.app, state, atomic_move=True)
    later = time.time() + 3600
    state.delete(Keys.breaker_probes(DEMO_DOWNSTREAM))
    state.hset(Keys.breaker(DEMO_DOWNSTREAM), mapping={"state": "open", "opened_at": 0})
    for i in range(5):
        member = f"held{i}".encode()
        state.zadd(key, {member: later})
        holder.hold(DEMO_DOWNSTREAM, f"held-task-{i}", (key, member), time.time() - i)
    assert state.zcount(key, "-inf", time.time()) == 0  # held: open breaker
    state.script_load(SETTLE_RECORDED_LUA)  # the lost send runs it (no NOSCRIPT reply)
    proxy.drop_on(sha(SETTLE_RECORDED_LUA), times=1, after_forward=True)
    resets_before = proxy.resets
    probe = stack.publish("demo.flaky", payload={"fail_rate": 0.0})
    stack.wait_effect(str(probe.id), timeout_s=30)
    wait_for(lambda: state.zcount(key, "-inf", time.time()) == 5, 15,
             "the held work to be released")
    assert proxy.resets - resets_before == 1  # the probe's settle reply was lost
    assert stack.rt.breakers.status(DEMO_DOWNSTREAM)["state"] == "closed"
    assert state.zcard(Keys.breaker_holds(DEMO_DOWNSTREAM)) == 0
    assert stack.effects(str(probe.id)) == 1
