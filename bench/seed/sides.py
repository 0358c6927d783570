"""Running one side of the seed scenario: its workers, the traffic, the wait until
every event has an outcome, and what the downstream, the DLQ and the broker saw."""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import alerts
from bench.common import clean_env, own_broker, start_workers, stop_worker, versions
from bench.seed.account import Observed, Sent, counter_totals, summarize
from bench.seed.downstream import (
    CALLS_KEY,
    CLASSES,
    DELIVERED_KEY,
    EFFECTS_KEY,
    FAILED_KEY,
    OUTAGE_CALLS_KEY,
    SCHEDULE_KEY,
)
from pipeline.core.state import Keys

__all__ = ["own_broker", "run", "traffic", "versions"]

Planned = tuple[str, str, float]  # (event id, class, seconds after the start)
START_MARGIN_S = 0.5  # the schedule is written this long before the first event
SETTLE_POLL_S = 0.5  # how often the settle wait counts outcomes
TIERS = ("critical", "high", "standard", "bulk")
PRIORITY_SUBQUEUES = range(1, 10)  # kombu's Redis priority sub-lists: "<queue>\x06\x16<n>"

BREAKER_TOML = """\
handler_modules = ["bench.seed.handlers"]

[breakers.partner-api]
failure_ratio = 0.5
min_calls = 20
consecutive_failures = 10
window_s = 30
open_s = {open_s}
half_open_probes = 2
"""


def traffic(rate: float, duration_s: float, seed: int) -> list[Planned]:
    """The same events for both sides: classes drawn by their shares, evenly spaced."""
    rng = random.Random(seed)
    names = list(CLASSES)
    weights = [CLASSES[n][1] for n in names]
    return [(str(uuid.UUID(int=rng.getrandbits(128))), rng.choices(names, weights)[0], k / rate)
            for k in range(int(rate * duration_s))]


def run(name: str, url: str, args: argparse.Namespace, plan: list[Planned],
        tmp: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    metrics_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for f in metrics_dir.glob("*.db"):
        f.unlink()
    side = _Tiered(url, args, tmp) if name == "tiered" else _Default(url, args, tmp)
    procs = start_workers(side.workers)
    recorder = alerts.Recorder(args.scrape_s) if side.scrape else None
    stop_scraping = threading.Event()
    try:
        t0 = time.time() + START_MARGIN_S
        outage = (t0 + args.outage_at_s, t0 + args.outage_at_s + args.outage_s)
        client.hset(SCHEDULE_KEY, mapping={"outage_start": outage[0], "outage_end": outage[1],
                                           "fail_rate": args.fail_rate,
                                           "timeout_ms": args.timeout_ms})
        scraper = None
        if recorder is not None and side.scrape is not None:
            scraper = threading.Thread(target=_scrape, daemon=True,
                                       args=(recorder, side.scrape, t0, stop_scraping))
            scraper.start()
        sent = _send(plan, side.send, t0)
        settle_s = _settle(client, side, len(sent), args.settle_timeout_s)
        final = side.scrape() if side.scrape is not None else None
        stop_scraping.set()
        if scraper is not None:
            scraper.join()
    finally:
        stop_scraping.set()
        for proc in procs:
            stop_worker(proc)
    seen = _observe(client, side)
    client.close()
    result: dict[str, Any] = {
        "classes": summarize(sent, seen, t0=t0, outage=outage, bucket_s=args.bucket_s),
        "calls": sum(seen.calls.values()), "outage_calls": side.outage_calls,
        "settle_s": settle_s, "broker_holds_at_end": seen.broker_holds,
        **side.describe()}
    if final is not None:
        result["runs"] = counter_totals(final, "pipeline_tasks_total", "outcome")
        result["budget_refusals"] = counter_totals(
            final, "pipeline_retry_budget_exhausted_total", "tier")
    in_outage = [seen.delivered[s.event_id] for s in sent
                 if outage[0] <= s.at < outage[1] and s.event_id in seen.delivered]
    result["recovered_at_s"] = max(in_outage, default=outage[1]) - t0
    if recorder is not None:
        result["alerts"] = alerts.evaluate(recorder, tmp)
        result["max_for_s"] = alerts.max_for_s()
    return result


def _send(plan: list[Planned], send: Callable[[dict[str, Any]], None], t0: float) -> list[Sent]:
    sent = []
    for event_id, cls, offset in plan:
        pause = t0 + offset - time.time()
        if pause > 0:
            time.sleep(pause)
        etype = CLASSES[cls][0]
        at = time.time()
        send({"id": event_id, "type": etype, "source": f"seed-{cls}", "payload": {"n": 1}})
        sent.append(Sent(event_id, cls, at))
    return sent


def _settle(client: redis.Redis, side: _Side, n: int, timeout_s: float) -> float:
    """Wait until every event is delivered, dead-lettered or given up on."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        pipe = client.pipeline(transaction=False)
        pipe.hlen(DELIVERED_KEY)
        pipe.hlen(FAILED_KEY)
        delivered, failed = pipe.execute()
        if int(delivered) + int(failed) + side.dead_lettered() >= n:
            break
        time.sleep(SETTLE_POLL_S)
    return time.monotonic() - start


def _scrape(recorder: alerts.Recorder, scrape: Callable[[], str], t0: float,
            stop: threading.Event) -> None:
    step = 0
    while not stop.is_set():
        pause = t0 + step * recorder.interval_s - time.time()
        if pause > 0 and stop.wait(pause):
            return
        recorder.add(scrape())
        step += 1


def _observe(client: redis.Redis, side: _Side) -> Observed:
    def table(key: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]
        return {k.decode(): v.decode() for k, v in raw.items()}

    held = int(client.hlen("unacked"))
    for queue in side.queues:
        held += int(client.llen(queue)) + sum(int(client.llen(f"{queue}\x06\x16{n}"))
                                              for n in PRIORITY_SUBQUEUES)
        held += int(client.zcard(Keys.retries(queue)))
    side.outage_calls = int(client.get(OUTAGE_CALLS_KEY) or 0)
    return Observed(
        delivered={k: float(v) for k, v in table(DELIVERED_KEY).items()},
        effects={k: int(v) for k, v in table(EFFECTS_KEY).items()},
        calls={k: int(v) for k, v in table(CALLS_KEY).items()},
        dead_lettered=side.dead_lettered_ids(), failed_logged=set(table(FAILED_KEY)),
        broker_holds=held)


class _Side:
    workers: list[tuple[list[str], dict[str, str], Path]]
    queues: list[str]
    scrape: Callable[[], str] | None = None
    outage_calls = 0

    def send(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def dead_lettered(self) -> int:
        return 0

    def dead_lettered_ids(self) -> set[str]:
        return set()

    def describe(self) -> dict[str, Any]:
        return {}


class _Default(_Side):
    """Celery's defaults: one queue, one worker with every slot (:mod:`bench.seed.stock`)."""

    def __init__(self, url: str, args: argparse.Namespace, tmp: Path) -> None:
        from bench.seed.stock import app

        app.conf.update(broker_url=url)
        self.app = app
        slots = sum(args.tier_slots.values())
        env = {**clean_env(), "BENCH_BROKER_URL": url,
               "SEED_STOCK_RETRY_DELAY_S": str(args.stock_retry_delay_s)}
        self.workers = [([sys.executable, "-m", "celery", "-A", "bench.seed.stock", "worker",
                          "-c", str(slots), "-n", "default@%h", "-l", "INFO",
                          "--without-gossip", "--without-mingle"], env, tmp / "default.log")]
        self.queues = ["celery"]
        self.slots = slots
        self.retry_delay_s = args.stock_retry_delay_s

    def send(self, event: dict[str, Any]) -> None:
        self.app.send_task("seed.handle", args=(event,))

    def describe(self) -> dict[str, Any]:
        return {"layout": f"one queue, one worker -c {self.slots}, prefetch 4, early acks, "
                          f"autoretry max_retries 3 every {self.retry_delay_s:g} s, no DLQ"}


class _Tiered(_Side):
    """The pipeline on its shipped tiers, a worker per tier sharing the slots."""

    def __init__(self, url: str, args: argparse.Namespace, tmp: Path) -> None:
        config = tmp / "seed.toml"
        config.write_text(BREAKER_TOML.format(open_s=1 if args.quick else 10))
        env = {"PIPELINE_BROKER_URL": url, "PIPELINE_CONFIG": str(config)}
        for tier, slots in args.tier_slots.items():
            env[f"PIPELINE_TIERS__{tier.upper()}__CONCURRENCY"] = str(slots)
            if args.quick:  # time scaled down: retry delays of a fraction of a second
                env[f"PIPELINE_TIERS__{tier.upper()}__BACKOFF_BASE_S"] = "0.2"
                env[f"PIPELINE_TIERS__{tier.upper()}__BACKOFF_MAX_S"] = "2"
                env[f"PIPELINE_TIERS__{tier.upper()}__RETRY_BUDGET_WINDOW_S"] = "2"
        os.environ.update(env)  # this process's publisher reads the same settings
        from pipeline.app import create_app
        from pipeline.config.load import load_settings
        from pipeline.observe.exporter import build_registry
        from pipeline.observe.exporter import scrape as scrape_text
        from pipeline.worker.runtime import runtime_for

        self.settings = load_settings()
        self.rt = runtime_for(create_app(self.settings, main="bench-seed"))
        registry = build_registry(self.rt)
        self.scrape = lambda: scrape_text(registry).decode()
        worker_env = {**clean_env(), **env,
                      "PROMETHEUS_MULTIPROC_DIR": os.environ["PROMETHEUS_MULTIPROC_DIR"]}
        self.workers = [([sys.executable, "-m", "pipeline", "worker", "--tier", tier,
                          "--without-gossip", "--without-mingle"], worker_env,
                         tmp / f"tiered-{tier}.log") for tier in TIERS]
        self.queues = [self.settings.queue_for(t) for t in TIERS]
        self.tier_slots = args.tier_slots

    def send(self, event: dict[str, Any]) -> None:
        result = self.rt.publisher.publish(event)
        assert result.outcome == "accepted", result

    def dead_lettered(self) -> int:
        return self.rt.dlq.depth()

    def dead_lettered_ids(self) -> set[str]:
        return {str(r.event.get("id")) for r in self.rt.dlq.iter_records()}

    def describe(self) -> dict[str, Any]:
        tiers = {t: self.settings.tier(t) for t in TIERS}
        return {"layout": "a worker per tier: " + ", ".join(
                    f"{t} -c {self.tier_slots[t]} (max_retries {c.max_retries})"
                    for t, c in tiers.items()) + "; partner-api breaker; DLQ",
                "critical_slo_s": tiers["critical"].slo_s}

