"""The begin and settle steps against a real Redis: verdicts, idempotency, recheck."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis

from pipeline.core.state import Keys
from pipeline.core.tiers import TierConfig
from pipeline.local.embedded import start_server
from pipeline.worker.batchledger import BatchLedger
from pipeline.worker.ledger import Ledger, Outcome, Try, try_key
from pipeline.worker.settlestream import Call, SettleStream
from tests.integration.support import wait_for

TIER = TierConfig(retry_budget_ratio=0)


@pytest.fixture
def ledger(redis_url: str) -> Ledger:
    return Ledger(redis.Redis.from_url(redis_url), window_s=3600)


def _begin(ledger: Ledger, task: str, token: str, key: str = "1.0") -> str:
    return ledger.begin(Try((task, key, token), 1, "t", TIER, False)).verdict


def test_a_begin_resent_by_the_same_delivery_runs_and_another_delivery_finds_it_lost(
    ledger: Ledger,
) -> None:
    task = str(uuid.uuid4())
    assert _begin(ledger, task, "a") == "run"
    assert _begin(ledger, task, "a") == "run"  # the client retried after a lost reply
    lost = ledger.begin(Try((task, "1.0", "b"), 1, "t", TIER, False))
    assert lost.verdict == "lost"
    assert lost.previous.startswith("a ")
    assert lost.previous_process[1] > 0
    assert -0.001 <= lost.age_s < 5  # the mark keeps the server time to the millisecond, rounded


def test_settle_is_idempotent_and_a_redelivery_of_a_settled_try_is_not_run(
    ledger: Ledger, redis_url: str,
) -> None:
    task = str(uuid.uuid4())
    zset = f"test:sched:{task}"
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("schedule", zset, b"retry-1", 5.0)) is True
    assert ledger.settle(task, "1.0", Outcome("schedule", zset, b"retry-2", 6.0)) is False
    client = redis.Redis.from_url(redis_url)
    assert client.zrange(zset, 0, -1) == [b"retry-1"]  # one outcome, not two lineages
    assert not client.exists(Keys.running(task, "1.0"))
    assert _begin(ledger, task, "c") == "settled"
    assert _begin(ledger, task, "c", key=try_key(2)) == "run"  # the next attempt is new


def test_success_writes_the_done_mark_that_every_later_try_sees(ledger: Ledger) -> None:
    task = str(uuid.uuid4())
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("done")) is True
    assert _begin(ledger, task, "b", key=try_key(1, lineage="replay")) == "done"


def test_settle_only_if_running_leaves_a_try_that_never_began(ledger: Ledger) -> None:
    task = str(uuid.uuid4())
    assert ledger.settle(task, "1.0", Outcome("none"), only_if_running=True) is False
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("none"), only_if_running=True) is True


def test_recheck_schedules_the_try_again_and_leaves_it_unsettled(
    ledger: Ledger, redis_url: str,
) -> None:
    task = str(uuid.uuid4())
    zset = f"test:sched:{task}"
    assert _begin(ledger, task, "a") == "run"
    assert ledger.settle(task, "1.0", Outcome("recheck", zset, b"again", 9.0)) is True
    assert redis.Redis.from_url(redis_url).zscore(zset, b"again") == 9.0
    assert _begin(ledger, task, "b") == "lost"  # still running elsewhere, not settled


def test_a_batch_claims_tries_pending_and_a_lost_claim_is_taken_over_without_a_lost_attempt(
    ledger: Ledger,
) -> None:
    tasks = [str(uuid.uuid4()) for _ in range(3)]
    tries = [Try((t, "1.0", f"tok{i}"), 1, "t", TIER, False) for i, t in enumerate(tasks)]
    assert [b.verdict for b in ledger.begin_many(tries)] == ["run", "run", "run"]
    keys, args = ledger.start_call(tries[0])
    assert ledger.start_script(keys=keys, args=args) == 1  # the first one started
    # a hard time limit settles only what started: the pending claims are left alone
    assert ledger.settle(tasks[1], "1.0", Outcome("none"), only_if_running=True) is False
    other = [Try((t, "1.0", f"other{i}"), 1, "t", TIER, False) for i, t in enumerate(tasks)]
    started, pending = ledger.begin(other[0]), ledger.begin(other[1])
    assert started.verdict == pending.verdict == "lost"
    assert not started.pending
    assert pending.pending
    assert pending.previous.startswith("~tok1 ")
    assert ledger.take_over(other[1], pending.previous).verdict == "run"
    keys, args = ledger.start_call(tries[1])
    assert ledger.start_script(keys=keys, args=args) == 0  # no longer the batch's claim
    # a take-over whose expected mark changed meanwhile finds the try lost again
    assert ledger.take_over(other[2], "~someone else").verdict == "lost"


@pytest.fixture(scope="module", params=["replies off", "replies read"])
def stream_url(request: pytest.FixtureRequest, redis_url: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that takes ``CLIENT REPLY`` (the stream turns replies off), and one
    whose user may not run ``CLIENT`` (an ACL: the stream reads every reply)."""
    if request.param == "replies off":
        yield redis_url
        return
    server = start_server(tmp_path_factory.mktemp("acl"), persist=False)
    try:
        redis.Redis.from_url(server.url).acl_setuser(
            "noclient", enabled=True, nopass=True, keys=["~*"], channels=["*"],
            commands=["+@all", "-client"])
        yield f"redis://noclient:x@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


def _settle(ledger: Ledger, task: str, redo: Callable[[], object] | None = None) -> Call:
    return Call(ledger.settle_script, *ledger.settle_call(task, "1.0", Outcome("done")),
                what=task, redo=redo or (lambda: ledger.settle(task, "1.0", Outcome("done"))),
                applied_if=(Keys.settled(task, "1.0"), Keys.done(task)))


def test_a_streamed_settle_that_redis_refused_is_written_again_at_close(
    stream_url: str,
) -> None:
    """Scripts flushed (a restarted Redis) between two settles of a batch: found at
    close (its NOSCRIPT reply, or its missing effect) and that settle written again."""
    ledger = Ledger(redis.Redis.from_url(stream_url), window_s=3600)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    stream = SettleStream(ledger.client)
    redone: list[str] = []

    def redo(task: str) -> Callable[[], object]:
        def again() -> bool:
            redone.append(task)
            return ledger.settle(task, "1.0", Outcome("done"))
        return again

    stream.send([_settle(ledger, first, redo(first))])  # loads the script on the stream
    # applied (a corked write leaves within 200 ms) before the scripts are flushed
    wait_for(lambda: ledger.client.exists(Keys.done(first)), 5, "the first settle")
    ledger.client.script_flush()
    stream.send([_settle(ledger, second, redo(second))])
    assert [what for what, _ in stream.close()] == [first]
    assert redone == [second]
    for task in (first, second):
        assert ledger.client.exists(Keys.done(task)) == 1
        assert ledger.begin(Try((task, "1.0", "again"), 1, "t", TIER, False)).verdict == "done"


def _script_loads(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_script|load", stats.get("cmdstat_script", {})).get("calls", 0))


def test_a_batch_on_a_connection_that_loaded_the_scripts_loads_none_and_reloads_after_a_flush(
    stream_url: str,
) -> None:
    ledger = Ledger(redis.Redis.from_url(stream_url), window_s=3600)
    client = ledger.client
    first = SettleStream(client)
    first.send([_settle(ledger, str(uuid.uuid4()))])
    assert len(first.close()) == 1
    loads = _script_loads(client)
    assert loads > 0
    second = SettleStream(client)  # the pool hands back the same connection
    second.send([_settle(ledger, str(uuid.uuid4()))])
    assert len(second.close()) == 1
    assert _script_loads(client) == loads  # nothing loaded again
    client.script_flush()
    third = SettleStream(client)
    task = str(uuid.uuid4())
    third.send([_settle(ledger, task)])
    assert third.close() == []  # NOSCRIPT: written again synchronously
    assert client.exists(Keys.done(task)) == 1
    fourth = SettleStream(client)
    fourth.send([_settle(ledger, str(uuid.uuid4()))])
    assert len(fourth.close()) == 1  # loaded again, confirmed


def test_a_script_first_used_mid_stream_is_loaded_in_order_and_each_call_gets_its_reply(
    stream_url: str,
) -> None:
    client = redis.Redis.from_url(stream_url)  # its own connection: nothing loaded on it
    ledger = Ledger(client, window_s=3600)
    seven = client.register_script(f"return 7 -- {uuid.uuid4()}")  # never loaded before
    task = str(uuid.uuid4())
    stream = SettleStream(client)
    stream.send([_settle(ledger, task)])
    stream.send([Call(seven, [], [], what="seven")])  # the settle's reply is still due
    confirmed = stream.close()
    if stream_url.startswith("redis://noclient"):  # every reply read, each its own
        assert confirmed == [(task, 1), ("seven", 7)]
    else:  # replies off: the settle confirmed by its effect
        assert confirmed == [(task, None)]
    assert client.get("absent") is None  # the pooled connection answers, no stray reply
    assert client.exists(Keys.done(task)) == 1


BEGIN_STATES = ["fresh", "done", "settled", "running", "pending", "other_running",
                "other_pending", "done_and_other", "fresh"]  # what each try finds


def _set_state(client: redis.Redis, t: Try, state: str, now: float) -> None:
    task, key, token = t.ids
    if state.startswith("done"):
        client.set(Keys.done(task), "1")
    if state == "settled":
        client.set(Keys.settled(task, key), "failed")
    mark = {"running": f"{token} h 1 {now:.3f}", "pending": f"~{token} h 1 {now:.3f}",
            "other_running": f"other h 1 {now - 5:.3f}", "done_and_other": f"x h 1 {now:.3f}",
            "other_pending": f"~other h 1 {now - 5:.3f}"}.get(state)
    if mark is not None:
        client.set(Keys.running(task, key), mark)


@pytest.mark.parametrize("budget_ratio", [0.0, 0.5])
def test_a_batch_of_first_attempts_begins_as_the_general_loop_does_state_by_state(
    ledger: Ledger, budget_ratio: float,
) -> None:
    """The batch's own begin (steps shared by its tries done once) gives each try the
    verdict, running mark and retry-budget count the ledger's own begin gives it."""
    client, tier = ledger.client, TierConfig(retry_budget_ratio=budget_ratio)
    seconds, micros = client.time()
    now = seconds + micros / 1e6
    batch = BatchLedger(ledger)
    seen = []
    for script in (batch._begin_many, batch._begin_firsts):  # the general loop, the batch's
        name = uuid.uuid4().hex  # its own tier: its own budget buckets
        tries = [Try((str(uuid.uuid4()), "1.0", uuid.uuid4().hex), 1, name, tier, False)
                 for _ in BEGIN_STATES]
        for t, state in zip(tries, BEGIN_STATES, strict=True):
            _set_state(client, t, state, now)
        call = batch._begin_call(tries)
        replies = script(keys=call.keys, args=call.args)
        marks = cast(list[bytes | None],
                     client.mget([Keys.running(t.ids[0], "1.0") for t in tries]))
        budget = [client.hgetall(k) for k in client.keys(f"{Keys.retry_budget(name)}*")]
        seen.append((
            [r if r == 1 else [p.decode() if i != 2 else int(float(p))
                               for i, p in enumerate(r)] for r in replies],
            [None if m is None else m.replace(t.ids[2].encode(), b"T").rsplit(b" ", 1)[0]
             for m, t in zip(marks, tries, strict=True)],
            budget))
    assert seen[0] == seen[1]
    verdicts = seen[1][0]
    assert verdicts[0] == 1
    assert verdicts[1:4] == [["done"], ["settled"], 1]
    assert verdicts[5] == ["lost", "other h 1 %.3f" % (now - 5), 5]
    assert seen[1][2] == ([{b"first": b"2"}] if budget_ratio else [])  # the fresh ones


def test_a_batch_whose_tries_all_run_is_answered_with_their_marks_tail_and_each_is_claimed(
    ledger: Ledger,
) -> None:
    """The usual begin (every try to run) comes back as one string, the tail of every
    running mark it wrote, and the usual check (every settle applied) as one integer;
    any other verdict brings back the whole list."""
    batch = BatchLedger(ledger)
    tries = [Try((str(uuid.uuid4()), "1.0", uuid.uuid4().hex), 1, "t", TIER, False)
             for _ in range(5)]
    call = batch._begin_call(tries)
    tail = batch._begin_firsts(keys=call.keys, args=call.args)
    assert isinstance(tail, bytes)
    assert tail.startswith(b" ")
    marks = cast(list[bytes | None],
                 ledger.client.mget([Keys.running(t.ids[0], "1.0") for t in tries]))
    assert marks == [b"~" + t.ids[2].encode() + tail for t in tries]
    ledger.client.set(Keys.done(tries[2].ids[0]), "1")
    replies = batch._begin_firsts(keys=call.keys, args=call.args)
    assert replies[:3] == [1, 1, [b"done"]]
    assert [b.verdict for b in BatchLedger(ledger).begin_many(tries)] == [
        "run", "run", "done", "run", "run"]
    applied = SettleStream(ledger.client)._applied
    present, absent = Keys.done(tries[2].ids[0]), f"{Keys.prefix}absent:{uuid.uuid4()}"
    assert applied(keys=[absent, present] * 3) == 3
    assert applied(keys=[absent, present, absent, absent]) == [1, 0]


def _no_redo() -> None:
    raise AssertionError("a settle had to be written again")


@pytest.mark.parametrize("written", ["as plain commands", "as the script"])
def test_a_batch_s_done_settles_leave_the_same_marks_as_plain_commands_or_as_the_script(
    ledger: Ledger, written: str,
) -> None:
    """Settles on a quiet stream go out as SET / DEL / SET XX; with no marks' tail from
    the begin they go out as the done-then-start script. Either way: each settled try
    has its done mark and no running mark, and the next one is started, not pending."""
    batch = BatchLedger(ledger)
    tries = [Try((str(uuid.uuid4()), "1.0", uuid.uuid4().hex), 1, "t", TIER, False)
             for _ in range(3)]
    assert [b.verdict for b in batch.begin_many(tries)] == ["run"] * 3
    pending = ledger.client.get(Keys.running(tries[2].ids[0], "1.0"))
    assert pending is not None
    if written == "as the script":
        batch._tail = None
    batch.start(tries[0])
    batch.settle_done(tries[0], tries[1], _no_redo)
    batch.settle_done(tries[1], tries[2], _no_redo)
    assert batch.close() == []
    client = ledger.client
    for t in tries[:2]:
        assert client.get(Keys.done(t.ids[0])) == b"1"
        assert 3590 < client.ttl(Keys.done(t.ids[0])) <= ledger.done_ttl_s
        assert not client.exists(Keys.running(t.ids[0], "1.0"))
        assert not client.exists(Keys.settled(t.ids[0], "1.0"))
    started = Keys.running(tries[2].ids[0], "1.0")
    assert client.get(started) == pending[1:]  # "~<token> <host> <pid> <time>" started
    assert client.ttl(started) > 0


def test_a_plain_start_does_not_bring_back_a_claim_that_is_gone(ledger: Ledger) -> None:
    batch = BatchLedger(ledger)
    tries = [Try((str(uuid.uuid4()), "1.0", uuid.uuid4().hex), 1, "t", TIER, False)
             for _ in range(2)]
    assert [b.verdict for b in batch.begin_many(tries)] == ["run"] * 2
    batch.start(tries[0])
    ledger.client.delete(Keys.running(tries[1].ids[0], "1.0"))  # settled elsewhere meanwhile
    batch.settle_done(tries[0], tries[1], _no_redo)
    batch.close()
    assert ledger.client.get(Keys.done(tries[0].ids[0])) == b"1"
    assert not ledger.client.exists(Keys.running(tries[1].ids[0], "1.0"))
