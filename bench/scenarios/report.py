"""``python -m bench report``: redraw every chart and write ``bench/results/REPORT.md``
from the results JSON of every scenario (``--quick``: from ``bench/results/quick/``)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from typing import Any

from bench.charts import render
from bench.common import commit, results_dir, versions
from bench.seed.account import describe_runs

# scenarios in REPORT.md's order; others follow, by name
ORDER = ["seed", "isolation", "overhead", "latency", "ingest", "batch", "dlq"]


def _server_version() -> str:
    try:
        from pipeline.local.embedded import find_server_binary

        out = subprocess.run([find_server_binary(), "--version"], capture_output=True,
                             text=True, check=True, timeout=10).stdout
        return " ".join(out.split()[:3])
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _checks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Targets as ``{name, value, op, target, met}``, whatever the scenario's format."""
    if "checks" in data:
        return list(data["checks"])
    found = []
    if isinstance(data.get("targets"), dict):  # ingest: ratios[name] >= targets[name]
        for name, target in data["targets"].items():
            value = data.get("ratios", {}).get(name)
            if value is not None:
                found.append({"name": name, "value": value, "op": ">=", "target": target,
                              "met": value >= target})
    if "target_ratio" in data and "ratio" in data:  # batch
        found.append({"name": "ratio", "value": data["ratio"], "op": ">=",
                      "target": data["target_ratio"], "met": data["ratio"] >= data["target_ratio"]})
    return found


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _figures(name: str, data: dict[str, Any]) -> list[str]:
    if name == "isolation":
        rows = [[side, _fmt(s["critical_ms"]["p50"]), _fmt(s["critical_ms"]["p99"]),
                 _fmt(s["critical_ms_spaced"]["p99"]), _fmt(s["critical_ms_burst"]["p99"]),
                 _fmt(s["send_ms"]["p50"]) if "send_ms" in s else "-",
                 _fmt(s["bulk_events_per_s"]), f"{s['bulk']['handled']:,} + "
                 f"{s['bulk']['queued']:,} queued"]
                for side, s in data["sides"].items()]
        return [f"{data['backlog']:,} bulk events ({data['bulk_ms']:g} ms each) queued, "
                f"{data['slots']} worker slots per side ({data['critical_slots']} critical on "
                f"the tiered and bare sides), critical events every {data['interval_ms']:g} ms "
                f"plus bursts of {data['burst_size']} every {data['burst_every_s']:g} s for "
                f"{data['window_s']:g} s; latency = just before the send call -> handler start "
                f"(the send call itself included).", "",
                *_table(rows, ["side", "critical p50 ms", "critical p99 ms", "spaced p99 ms",
                               "burst p99 ms", "send call p50 ms", "bulk events/s",
                               "bulk handled + left"]), "",
                *_spaced(data["sides"])]
    if name == "overhead":
        rss = data["rss"]
        cpu = data.get("cpu_s_per_10k_events_median", {})
        rows = [[side, _fmt(v), _fmt(v / data["events_per_s_median"]["stock_noop"]),
                 _fmt(cpu[side]) if side in cpu else "-"]
                for side, v in data["events_per_s_median"].items()]
        return [f"{data['events']:,} no-op events per drain, median of {data['repeats']}, "
                f"one worker -c {data['concurrency']} {data['pool']}, prefetch "
                f"{data['prefetch']}.", "",
                *_table(rows, ["side", "events/s", "vs bare", "CPU s / 10k events"]), "",
                f"Worker RSS (main + children) over {rss['events']:,} events "
                f"({rss['events_per_s']:,.0f}/s): {rss['kb_at_10pct'] / 1024:,.1f} MiB at 10%, "
                f"{rss['kb_at_end'] / 1024:,.1f} MiB at the end: {rss['growth_pct']:+.1f}%."]
    if name == "latency":
        rows = [[side, _fmt(m["p50"]), _fmt(m["p99"])] for side, m in data["ms_median"].items()]
        return [f"{data['rate']:g} events/s for {data['duration_s']:g} s round-robin over "
                f"{', '.join(data['tiers'])}; one worker per tier with the shipped tiers' "
                "concurrency and prefetch, task events on both sides; latency = just before "
                f"the send call -> handler start, median of {data['repeats']}.", "",
                *_table(rows, ["side", "p50 ms", "p99 ms"])]
    if name == "seed":
        return _seed(data)
    if name.split("-")[0] == "io":  # io, io-batch10
        rows = [[f"{pool} -c {s['concurrency']}", _fmt(s["events_per_s"]),
                 _fmt(s["events_per_s"] / data["sides"]["prefork"]["events_per_s"]),
                 _fmt(s["handler_ms"]["p50"]), _fmt(s["handler_ms"]["p99"]),
                 _fmt(s["rss_mib_peak"]), str(s["processes"]), _fmt(s["cpu_ms_per_event"])]
                for pool, s in data["sides"].items()]
        return [f"{data['events']:,} events per side, each handler one HTTP call answered "
                f"after {data['delay_ms']:g} ms; one worker per side, task events off, "
                f"batch_size {data.get('batch_size', 0)}.", "",
                *_table(rows, ["side", "events/s", "vs prefork", "handler p50 ms",
                               "handler p99 ms", "RSS peak MiB", "processes",
                               "CPU ms/event"])]
    for key in ("events_per_s_median", "seconds_median"):
        if key in data:
            unit = "events/s" if key.startswith("events") else "seconds"
            rows = [[k, _fmt(v)] for k, v in data[key].items()]
            return _table(rows, ["side", f"{unit} (median)"])
    return []


def _seed(data: dict[str, Any]) -> list[str]:
    start, end = data["outage"]
    rows = [[side, cls, f"{c['sent']:,}", f"{c['pct']['delivered']:.2f}",
             f"{c['pct']['dead_lettered']:.2f}", f"**{c['pct']['lost']:.2f}**",
             str(c["duplicates"]), f"{c['calls_per_event']['mean']:.2f}",
             _fmt(c["latency_s"]["p50"]), _fmt(c["latency_s"]["p99"]),
             _fmt(c["latency_s_outside_outage"]["p99"])]
            for side, s in data["sides"].items() for cls, c in s["classes"].items()]
    lines = [f"{data['events']:,} events at {data['rate']:g}/s for {data['duration_s']:g} s "
             f"(reward 5% critical, game 20% high, interaction 50% standard, analytics 25% "
             f"bulk); the partner API fails {data['fail_rate']:.0%} of calls and is down "
             f"{start:g}-{end:g} s (calls hang {data['timeout_ms']:g} ms). Latency: send -> "
             "delivered, seconds.", ""]
    lines += [f"* **{side}**: {s.get('layout', '')}; {s['calls']:,} downstream calls "
              f"({s['outage_calls']:,} while it was down), settled {s['settle_s']:.0f} s after "
              "the traffic" + (f"; {runs}" if (runs := describe_runs(s)) else "") + "."
              for side, s in data["sides"].items()]
    lines += ["", *_table(rows, ["side", "class", "sent", "delivered %", "DLQ %", "lost %",
                                 "duplicates", "calls/event", "p50 s", "p99 s",
                                 "p99 s outside outage"]), ""]
    for side, s in data["sides"].items():
        found = s.get("alerts")
        if not found:
            continue
        if not found.get("evaluated"):
            lines.append(f"Alerts ({side}): not evaluated: {found.get('why')}.")
            continue
        lines.append(f"Alerts ({side}), `ops/prometheus/alerts.yml` evaluated by promtool over "
                     f"the run's scrapes every {found['interval_s']:g} s (times in s since "
                     "the traffic started):")
        lines += [f"* {a['alertname']} {_labels(a['labels'])}: pending {_span(a['pending'])}, "
                  f"firing {_span(a['firing'])}" for a in found["alerts"]] or [
                      "* none pending, none firing"]
    return lines


def _labels(labels: dict[str, str]) -> str:
    shown = {k: v for k, v in labels.items() if k not in ("alertname", "severity")}
    return "{" + ", ".join(f"{k}={v}" for k, v in shown.items()) + "}" if shown else ""


def _span(span: list[float] | None) -> str:
    return "never" if not span else f"{span[0]:g}-{span[1]:g} s"


def _spaced(sides: dict[str, Any]) -> list[str]:
    """The spaced events alone (the issue's "about 5 ms p99 here when spaced")."""
    if not {"shared", "tiered", "bare"} <= set(sides):
        return []
    p99 = {n: s["critical_ms_spaced"]["p99"] for n, s in sides.items()}
    return [f"Spaced events only (no bursts): tiered p99 {_fmt(p99['tiered'])} ms is "
            f"{_fmt(p99['shared'] / p99['tiered'])}x better than shared and "
            f"{_fmt(p99['tiered'] / p99['bare'])}x the bare task's ({_fmt(p99['bare'])} ms)."]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench report")
    parser.add_argument("--quick", action="store_true", help="report bench/results/quick/")
    args = parser.parse_args(argv)
    where = results_dir(args.quick)
    found = {p.stem: json.loads(p.read_text()) for p in sorted(where.glob("*.json"))}
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    v = versions()
    lines = [
        "# Benchmark report",
        "",
        "Written by `python -m bench report` from `bench/results/*.json`; each scenario was "
        "run with `python -m bench <scenario>` (own broker, both sides in the same run).",
        "",
        f"* commit (now; each scenario names the one it ran on when recorded): `{commit()}`",
        f"* machine: {_cores()} cores, Python {platform.python_version()}, Celery "
        f"{v['celery']}, kombu {v['kombu']}, redis-py {v['redis_py']}, broker "
        f"{_server_version()}",
        "",
    ]
    summary = []
    for name in names:
        data = found[name]
        chart = render(name, where)
        m = data.get("machine", {})
        lines += [f"## {name}", "",
                  f"Run {data.get('when', '?')} on {m.get('cpus', '?')} cores, Python "
                  f"{m.get('python', '?')}" + (f", Celery {m['celery']}" if "celery" in m else "")
                  + (f", broker {m['broker']}" if "broker" in m else "")
                  + (f", commit `{data['commit']}`" if "commit" in data else "") + ".", ""]
        lines += [*_figures(name, data), ""]
        checks = _checks(data)
        if checks:
            rows = [[c["name"], _fmt(c["value"]), f"{c['op']} {_fmt(c['target'])}",
                     "met" if c["met"] else "**missed**"] for c in checks]
            lines += [*_table(rows, ["target", "measured", "wanted", ""]), ""]
            summary += [f"{name}: {c['name']} {_fmt(c['value'])} "
                        f"({'met' if c['met'] else 'missed'})" for c in checks]
        else:
            lines += ["No target for this scenario.", ""]
        if chart is not None:
            lines += [f"![{name}]({chart.name})", ""]
    lines[7:7] = ["## Targets", "", *[f"* {s}" for s in summary], ""]
    out = where / "REPORT.md"
    out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"report: {out} ({len(names)} scenarios: {', '.join(names)})")
    return 0


def _cores() -> int:
    import os

    return os.cpu_count() or 0
