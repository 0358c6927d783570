"""The seed's before/after: a day of mixed traffic against a flaky partner API.

Traffic (:data:`bench.seed.downstream.CLASSES`): reward grants 5% (critical),
game updates 20% (high), user interactions 50% (standard), analytics 25% (bulk),
sent at ``--rate`` events/s for ``--duration-s``. Every event calls one partner
API, which fails ``--fail-rate`` of calls (503) and is fully down — calls hang
``--timeout-ms`` then fail — for ``--outage-s`` from ``--outage-at-s``.

Two sides, one after the other on the same own broker, same events (same seed),
same total worker slots (``--slots``):

* **default**: what a team writes first (:mod:`bench.seed.stock`): one queue,
  one worker ``-c slots``, Celery's defaults (prefetch 4, early acks) and
  ``autoretry_for`` with Celery's retry defaults (3 retries, 180 s apart); no DLQ.
* **tiered**: the pipeline on its shipped tier defaults (``pipeline/default.toml``),
  a worker per tier sharing the slots, the ``partner-api`` circuit breaker, the
  DLQ; scraped every ``--scrape-s`` for the alert evaluation (:mod:`bench.alerts`).

Each side runs until every event is delivered, dead-lettered or given up on (or
``--settle-timeout-s``), then its workers get a warm shutdown. Reported per class:
delivered / dead-lettered / lost %, duplicates, downstream calls per event,
latency (send -> delivered) overall, outside the outage and over time.

``--quick`` scales time down (10 s of traffic, 3 s outage, retry delays of
seconds) to check, in CI, that both sides run and every event is accounted for.

    python -m bench seed [--quick] [--rate 100] [--duration-s 180] ...
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import logs_kept_on_failure, results_dir, write_results
from bench.seed import sides as seed_sides
from bench.seed.account import describe_runs

TARGET_CRITICAL_FAILURE_PCT = 0.01  # critical events finally failed (DLQ or lost), at most


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench seed")
    parser.add_argument("--quick", action="store_true",
                        help="10 s of traffic, time scaled down; results in bench/results/quick/")
    parser.add_argument("--rate", type=float, default=100.0, help="events/s")
    parser.add_argument("--duration-s", type=float, help="traffic duration (default 180)")
    parser.add_argument("--outage-at-s", type=float, help="outage start (default 60)")
    parser.add_argument("--outage-s", type=float, help="outage length (default 60)")
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--timeout-ms", type=float, default=500.0,
                        help="how long a call hangs while the API is down")
    parser.add_argument("--slots", default="1,1,4,2",
                        help="worker slots of critical,high,standard,bulk (their sum is the "
                             "default side's -c)")
    parser.add_argument("--scrape-s", type=float, help="metrics scrape interval (default 5)")
    parser.add_argument("--settle-timeout-s", type=float,
                        help="per side, after the traffic (default: 3 stock retry delays + 300)")
    parser.add_argument("--sides", default="default,tiered")
    parser.add_argument("--seed", type=int, default=20, help="traffic random seed")
    args = parser.parse_args(argv)
    q = args.quick
    args.duration_s = args.duration_s or (10.0 if q else 180.0)
    args.outage_at_s = args.outage_at_s if args.outage_at_s is not None else (3.0 if q else 60.0)
    args.outage_s = args.outage_s or (3.0 if q else 60.0)
    args.scrape_s = args.scrape_s or (1.0 if q else 5.0)
    args.bucket_s = 1.0 if q else 5.0
    # Celery's default_retry_delay is 180 s; the quick run scales it to 1 s
    args.stock_retry_delay_s = 1.0 if q else 180.0
    args.settle_timeout_s = args.settle_timeout_s or (
        60.0 if q else 3 * args.stock_retry_delay_s + 300)
    args.tier_slots = dict(zip(("critical", "high", "standard", "bulk"),
                               (int(x) for x in args.slots.split(",")), strict=True))
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    # before anything imports prometheus_client: this process's ingest counters go
    # to files too, so the scrapes see them as the exporter would
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    sent_plan = seed_sides.traffic(args.rate, args.duration_s, args.seed)
    sides: dict[str, dict[str, Any]] = {}
    with logs_kept_on_failure(tmp), seed_sides.own_broker() as server:
        for name in args.sides.split(","):
            print(f"{name}: {len(sent_plan):,} events at {args.rate:g}/s for "
                  f"{args.duration_s:g} s, outage {args.outage_at_s:g}-"
                  f"{args.outage_at_s + args.outage_s:g} s ...", flush=True)
            sides[name] = seed_sides.run(name, server.url, args, sent_plan, tmp)
            _print_side(name, sides[name])
        machine = seed_sides.versions(server.url)
    checks = _checks(sides, args) if "tiered" in sides else []
    for c in checks:
        print(f"  {c['name']}: {c['value']:,.4g} (target {c['op']} {c['target']:g}: "
              f"{'met' if c['met'] else 'MISSED'})")
    path = write_results("seed", {
        "quick": args.quick, "rate": args.rate, "duration_s": args.duration_s,
        "outage": [args.outage_at_s, args.outage_at_s + args.outage_s],
        "fail_rate": args.fail_rate, "timeout_ms": args.timeout_ms,
        "tier_slots": args.tier_slots, "stock_retry_delay_s": args.stock_retry_delay_s,
        "scrape_s": args.scrape_s, "bucket_s": args.bucket_s, "events": len(sent_plan),
        "checks": checks, "sides": sides}, quick=args.quick, machine=machine)
    print(f"results: {path}")
    from bench.charts import render

    print(f"chart: {render('seed', results_dir(args.quick))}")
    _assert_accounted(sides)  # after writing: a full run's shortfall is a finding to keep
    return 0


def _print_side(name: str, side: dict[str, Any]) -> None:
    for cls, c in side["classes"].items():
        print(f"  {cls:<12} sent {c['sent']:>6,}  delivered {c['pct']['delivered']:6.2f}%  "
              f"DLQ {c['pct']['dead_lettered']:5.2f}%  lost {c['pct']['lost']:5.2f}%  "
              f"unsettled {c['unsettled']:>4}  dup {c['duplicates']:>3}  calls/event "
              f"{c['calls_per_event']['mean']:.2f}  p50 {c['latency_s']['p50']:7.2f}s  "
              f"p99 {c['latency_s']['p99']:7.2f}s (outside outage "
              f"{c['latency_s_outside_outage']['p99']:.2f}s)", flush=True)
    print(f"  downstream calls {side['calls']:,} ({side['outage_calls']:,} while it was "
          f"down); settled in {side['settle_s']:.0f} s after the traffic", flush=True)
    if runs := describe_runs(side):
        print(f"  {runs}", flush=True)
    for a in side.get("alerts", {}).get("alerts", []):
        print(f"  alert {a['alertname']} {a['labels']}: pending {a['pending']}, "
              f"firing {a['firing']}", flush=True)


def _checks(sides: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    ours = sides["tiered"]
    crit = ours["classes"]["reward"]
    failed_pct = 100.0 * (crit["dead_lettered"] + crit["lost"]) / max(crit["sent"], 1)
    p99 = crit["latency_s_outside_outage"]["p99"]
    slo = ours["critical_slo_s"]
    alerts = ours.get("alerts", {})
    start, end = args.outage_at_s, args.outage_at_s + args.outage_s
    # an alert "for the outage" starts firing between the outage start and the end of
    # the recovery (the last deferred event delivered) plus its rule's for: delay
    recovered_s = max(end, ours["recovered_at_s"])
    stray = [a for a in alerts.get("alerts", []) if a["firing"] and not
             (start <= a["firing"][0] <= recovered_s + ours["max_for_s"])]
    checks = [
        {"name": "tiered: events lost", "value": ours["classes"]["all"]["lost"], "op": "==",
         "target": 0, "met": ours["classes"]["all"]["lost"] == 0},
        {"name": "tiered: critical final failure %", "value": failed_pct, "op": "<",
         "target": TARGET_CRITICAL_FAILURE_PCT, "met": failed_pct < TARGET_CRITICAL_FAILURE_PCT},
        {"name": "tiered: critical p99 outside the outage (s)", "value": p99, "op": "<=",
         "target": slo, "met": p99 <= slo},
    ]
    if alerts.get("evaluated"):
        checks.append({"name": "tiered: alerts firing outside the outage", "value": len(stray),
                       "op": "==", "target": 0, "met": not stray})
    return checks  # the default config's losses are counted in its table: no target


def _assert_accounted(sides: dict[str, dict[str, Any]]) -> None:
    """The smoke test's assertion: every event has an outcome; ours loses none."""
    for name, side in sides.items():
        every = side["classes"]["all"]
        total = sum(every[k] for k in ("delivered", "dead_lettered", "failed_logged",
                                       "unsettled"))
        assert total == every["sent"], f"{name}: {total} outcomes for {every['sent']} events"
    if "tiered" in sides:
        ours = sides["tiered"]["classes"]["all"]
        assert ours["lost"] == 0, f"tiered: {ours['lost']} events lost"
        assert ours["unsettled"] == 0, f"tiered: {ours['unsettled']} events not settled"
