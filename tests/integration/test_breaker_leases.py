"""Half-open probe slots are expiring leases, against the suite's real Redis, fake clock.

Before leases, a probe that never called ``record()`` (killed, hard time limit,
deferred after ``allow()``) kept its slot forever and the breaker stayed half-open
with no probe allowed.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.config.model import BreakerConfig
from pipeline.core.state import Keys
from pipeline.worker.breaker import Breakers

LEASE_S = 10.0  # the probe lease these tests configure
OPEN_S = 5.0  # cool-down of these tests' breakers
OPENED_AT = 102.0  # fake clock: the third failure opens the breaker here
HALF_OPEN_AT = OPENED_AT + OPEN_S + 1  # fake clock: past the cool-down
CONCURRENT_CALLERS = 24  # threads racing for the probe slots


def config(probes: int) -> BreakerConfig:
    return BreakerConfig(consecutive_failures=3, open_s=OPEN_S, half_open_probes=probes,
                         probe_lease_s=LEASE_S)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def opened(client: redis.Redis, probes: int = 1) -> tuple[Breakers, str]:
    """A breaker that three failures opened at ``OPENED_AT``."""
    name = f"api-{uuid.uuid4().hex[:6]}"
    b = Breakers(client, {name: config(probes)})
    for i in range(3):
        b.record(name, ok=False, now=OPENED_AT - 2 + i)
    assert b.status(name, now=OPENED_AT)["state"] == "open"
    return b, name


def test_a_leaked_probe_slot_is_reclaimed_when_its_lease_expires(client: redis.Redis) -> None:
    b, name = opened(client)
    leaked = b.allow(name, now=HALF_OPEN_AT)  # its worker dies: no record, no release
    assert leaked.retry_in_s == 0
    assert leaked.token
    assert b.allow(name, now=HALF_OPEN_AT + 1).retry_in_s > 0
    assert b.allow(name, now=HALF_OPEN_AT + LEASE_S - 0.01).retry_in_s > 0
    probe = b.allow(name, now=HALF_OPEN_AT + LEASE_S)
    assert (probe.state, probe.retry_in_s) == ("half_open", 0.0)
    assert probe.token not in (None, leaked.token)
    assert b.record(name, ok=True, now=HALF_OPEN_AT + LEASE_S + 1, token=probe.token) \
        == "closed"


def test_recording_a_probe_releases_its_lease(client: redis.Redis) -> None:
    b, name = opened(client)
    probe = b.allow(name, now=HALF_OPEN_AT)
    assert b.record(name, ok=False, now=HALF_OPEN_AT + 1, token=probe.token) == "open"
    assert client.zcard(Keys.breaker_probes(name)) == 0
    again = b.allow(name, now=HALF_OPEN_AT + 1 + OPEN_S)  # a fresh half-open period
    assert again.retry_in_s == 0
    assert b.record(name, ok=True, now=HALF_OPEN_AT + 2 + OPEN_S, token=again.token) == "closed"
    assert client.zcard(Keys.breaker_probes(name)) == 0


def test_record_without_a_token_still_settles_a_half_open_breaker(
        client: redis.Redis) -> None:
    b, name = opened(client)
    assert b.allow(name, now=HALF_OPEN_AT).retry_in_s == 0
    assert b.record(name, ok=True, now=HALF_OPEN_AT + 1) == "closed"
    assert client.zcard(Keys.breaker_probes(name)) == 0


def test_release_without_an_outcome_frees_the_slot_and_stays_half_open(
        client: redis.Redis) -> None:
    b, name = opened(client)
    probe = b.allow(name, now=HALF_OPEN_AT)
    assert b.allow(name, now=HALF_OPEN_AT + 0.1).retry_in_s > 0
    assert b.release(name, probe.token) is True
    assert b.status(name, now=HALF_OPEN_AT + 0.2)["state"] == "half_open"
    assert b.status(name, now=HALF_OPEN_AT + 0.2)["consecutive_failures"] == 0
    assert b.allow(name, now=HALF_OPEN_AT + 0.2).retry_in_s == 0
    assert b.release(name, probe.token) is False  # released once only
    assert b.release(name, None) is False  # allowed while closed: nothing to give back


def test_a_stale_token_never_frees_another_probes_slot(client: redis.Redis) -> None:
    b, name = opened(client)
    stale = b.allow(name, now=HALF_OPEN_AT)
    current = b.allow(name, now=HALF_OPEN_AT + LEASE_S)  # stale's lease expired
    assert current.retry_in_s == 0
    assert b.release(name, stale.token) is False
    assert b.allow(name, now=HALF_OPEN_AT + LEASE_S + 1).retry_in_s > 0


def test_a_caller_chosen_token_can_be_settled_by_another_process(
        client: redis.Redis) -> None:
    b, name = opened(client)
    token = "task-1:attempt-2:api"  # what a hard-time-limit handler in the parent knows
    assert b.allow(name, now=HALF_OPEN_AT, token=token).token == token
    other = Breakers(client, {name: config(1)})
    assert other.record(name, ok=False, now=HALF_OPEN_AT + 1, token=token) == "open"
    assert client.zcard(Keys.breaker_probes(name)) == 0


def test_concurrent_probes_never_exceed_half_open_probes(client: redis.Redis) -> None:
    probes = 3
    b, name = opened(client, probes=probes)
    start = threading.Barrier(CONCURRENT_CALLERS)
    granted: list[str] = []
    lock = threading.Lock()

    def caller(now: float) -> None:
        start.wait()
        status = b.allow(name, now=now)
        if status.retry_in_s == 0:
            assert status.token is not None
            with lock:
                granted.append(status.token)

    threads = [threading.Thread(target=caller, args=(HALF_OPEN_AT + i / 1000,))
               for i in range(CONCURRENT_CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == probes
    assert len(set(granted)) == probes
    assert b.status(name, now=HALF_OPEN_AT + 1)["probes_leased"] == probes


def test_leases_expiring_and_renewed_keep_at_most_half_open_probes_live(
        client: redis.Redis) -> None:
    probes = 2
    b, name = opened(client, probes=probes)
    live: dict[str, float] = {}  # token -> expiry, as the test sees it
    for step in range(200):  # every caller leaks its lease; time moves 0.5 s a step
        now = HALF_OPEN_AT + step / 2
        status = b.allow(name, now=now)
        live = {t: exp for t, exp in live.items() if exp > now}
        if status.retry_in_s == 0:
            assert status.token is not None
            live[status.token] = now + LEASE_S
        assert len(live) <= probes
        assert b.status(name, now=now)["probes_leased"] == len(live)
    assert len(live) == probes  # slots were reclaimed and handed out again


def test_an_unset_lease_is_derived_from_the_longest_tier_time_limit(
        client: redis.Redis) -> None:
    name = "api"
    derived = Breakers(client, {name: BreakerConfig()}, longest_time_limit_s=300.0)
    assert derived.probe_lease_s(name) == 330.0
    assert Breakers(client, {}).probe_lease_s(name) == 120.0  # default 90 s limit + 30 s
    assert Breakers(client, {name: config(1)}, longest_time_limit_s=300.0) \
        .probe_lease_s(name) == LEASE_S
