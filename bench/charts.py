"""One PNG per scenario, drawn from its results JSON alone (so ``python -m bench
report`` can redraw every chart): ``<dir>/<scenario>.json`` -> ``<dir>/<scenario>.png``."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["render"]

COLORS = {"shared": "tab:red", "tiered": "tab:green", "bare": "tab:blue"}


def render(scenario: str, directory: Path) -> Path | None:
    """Draw ``scenario``'s chart next to its JSON; None when there is no drawer for it."""
    draw = DRAWERS.get(scenario) or DRAWERS.get(scenario.split("-")[0])  # io-batch10: io
    source = directory / f"{scenario}.json"
    if draw is None or not source.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(source.read_text())
    fig = draw(plt, data)
    fig.suptitle(f"{scenario}{' (quick)' if data.get('quick') else ''}: "
                 f"{data.get('when', '')}, {data['machine'].get('cpus', '?')} cores", fontsize=9,
                 y=0.995)
    fig.tight_layout()
    out = directory / f"{scenario}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bars(ax: Any, labels: list[str], values: list[float], fmt: str = "{:,.0f}") -> None:
    bars = ax.bar(labels, values, color="tab:blue")
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)


def _isolation(plt: Any, data: dict[str, Any]) -> Any:
    sides = data["sides"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(sides)
    width = 0.38
    for offset, q in ((-width / 2, "p50"), (width / 2, "p99")):
        values = [sides[n]["critical_ms"][q] for n in names]
        bars = left.bar([i + offset for i in range(len(names))], values, width, label=q,
                        color="tab:gray" if q == "p50" else "tab:orange")
        for bar, value in zip(bars, values, strict=True):
            left.annotate(f"{value:,.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    left.set_xticks(range(len(names)),
                    [f"{n}\nbulk {sides[n]['bulk_events_per_s']:,.0f}/s" for n in names])
    left.set_yscale("log")
    left.set_ylabel("critical latency, ms (log)")
    left.set_title(f"critical enqueue -> handler start, {data['backlog']:,} bulk backlog, "
                   f"{data['slots']} slots per side", fontsize=9)
    left.legend()
    for name in names:
        samples = sides[name]["samples"]
        right.scatter([s[0] for s in samples], [max(s[1], 0.01) for s in samples], s=4,
                      color=COLORS.get(name), label=name, alpha=0.6)
    right.set_yscale("log")
    right.set_xlabel("seconds since the first critical event")
    right.set_ylabel("latency, ms (log)")
    right.set_title("each critical event (spaced every "
                    f"{data['interval_ms']:g} ms, bursts of {data['burst_size']})", fontsize=9)
    right.legend()
    return fig


def _overhead(plt: Any, data: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = data["events_per_s_median"]
    labels = {"stock_noop": "bare Celery", "stock_noop_task_events": "bare Celery -E",
              "pipeline": "pipeline", "pipeline_no_task_events": "pipeline\nno task events"}
    shown = [k for k in labels if k in rates]
    _bars(left, [labels[k] for k in shown], [rates[k] for k in shown])
    left.tick_params(axis="x", labelsize=8)
    left.set_ylabel("no-op events/s, one worker")
    left.set_title(f"drain of a pre-filled queue, -c {data['concurrency']} prefork: "
                   f"{data['ratio']:.2f}x (task events on vs off)", fontsize=9)
    rss = data["rss"]
    samples = rss["samples"]
    right.plot([s[0] * 100 for s in samples], [s[1] / 1024 for s in samples], label="main")
    right.plot([s[0] * 100 for s in samples], [s[2] / 1024 for s in samples],
               label="pool children (sum)")
    right.plot([s[0] * 100 for s in samples], [(s[1] + s[2]) / 1024 for s in samples],
               label="total")
    right.axvline(10, color="gray", linestyle=":")
    right.set_xlabel(f"% of {rss['events']:,} events handled")
    right.set_ylabel("RSS, MiB")
    right.set_ylim(bottom=0)
    right.set_title(f"worker RSS growth 10% -> 100%: {rss['growth_pct']:+.1f}%", fontsize=9)
    right.legend()
    return fig


def _ingest(plt: Any, data: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    rates = data["events_per_s_median"]
    _bars(ax, list(rates), list(rates.values()))
    ax.set_ylabel("events/s published")
    ax.set_title(f"{data['events']:,} events, median of {data['repeats']}", fontsize=9)
    return fig


def _batch(plt: Any, data: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    rates = data["events_per_s_median"]
    _bars(ax, list(rates), list(rates.values()))
    ax.set_yscale("log")
    ax.set_ylabel("events/s, one worker (log)")
    ax.set_title(f"batch_size {data['batch_size']}, -c {data['concurrency']}: "
                 f"{data['ratio']:.1f}x", fontsize=9)
    return fig


def _dlq(plt: Any, data: dict[str, Any]) -> Any:
    fig, ax = plt.subplots(figsize=(8, 4))
    secs = data["seconds_median"]
    _bars(ax, list(secs), list(secs.values()), "{:.2f}s")
    ax.set_ylabel("seconds")
    ax.set_title(f"{data['records']:,} DLQ records, median of {data['repeats']}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    return fig


def _io(plt: Any, data: dict[str, Any]) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sides = data["sides"]
    labels = [f"{p} -c {s['concurrency']}" for p, s in sides.items()]
    _bars(left, labels, [s["events_per_s"] for s in sides.values()])
    left.set_ylabel("events/s, one worker")
    left.set_title(f"{data['events']:,} events, {data['delay_ms']:g} ms downstream", fontsize=9)
    _bars(right, labels, [s["rss_mib_peak"] for s in sides.values()], "{:,.0f} MiB")
    right.set_ylabel("RSS of the worker's processes (peak, MiB)")
    right.set_title("memory", fontsize=9)
    return fig


CLASS_COLORS = {"reward": "tab:red", "game": "tab:orange", "interaction": "tab:blue",
                "analytics": "tab:gray"}


def _seed(plt: Any, data: dict[str, Any]) -> Any:
    sides = data["sides"]
    fig = plt.figure(figsize=(13, 8))
    grid = fig.add_gridspec(2, len(sides))
    top = [fig.add_subplot(grid[0, i]) for i in range(len(sides))]
    for ax in top[1:]:
        ax.sharey(top[0])
    start, end = data["outage"]
    for ax, (name, side) in zip(top, sides.items(), strict=True):
        for cls, c in side["classes"].items():
            if cls == "all":
                continue
            rows = c["timeline"]
            ax.plot([r[0] for r in rows], [max(r[2], 1e-3) for r in rows],
                    color=CLASS_COLORS.get(cls), label=f"{cls} p99")
            ax.plot([r[0] for r in rows], [max(r[1], 1e-3) for r in rows],
                    color=CLASS_COLORS.get(cls), linestyle=":", alpha=0.7)
        ax.axvspan(start, end, color="tab:red", alpha=0.1, label="partner API down")
        ax.set_yscale("log")
        ax.set_xlabel("send time, s")
        ax.set_ylabel("latency send -> delivered, s (log; dotted p50)")
        every = side["classes"]["all"]
        ax.set_title(f"{name}: delivered {every['pct']['delivered']:.2f}%, lost "
                     f"{every['pct']['lost']:.2f}%, DLQ {every['pct']['dead_lettered']:.2f}%\n"
                     + textwrap.fill(side.get("layout", ""), 80), fontsize=8)
        ax.legend(fontsize=7)
    bottom = fig.add_subplot(grid[1, :])
    classes = [c for c in next(iter(sides.values()))["classes"] if c != "all"] + ["all"]
    width = 0.8 / (2 * len(sides))
    for k, (name, side) in enumerate(sides.items()):
        for j, what in enumerate(("lost", "dead_lettered")):
            values = [side["classes"][c]["pct"][what] for c in classes]
            offset = (2 * k + j - len(sides) + 0.5) * width
            bars = bottom.bar([i + offset for i in range(len(classes))], values, width,
                              label=f"{name}: {what.replace('_', '-')} %",
                              color=COLORS.get("shared" if name == "default" else name),
                              alpha=1.0 if what == "lost" else 0.45)
            for bar, value in zip(bars, values, strict=True):
                bottom.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2,
                                                 bar.get_height()),
                                ha="center", va="bottom", fontsize=7)
    bottom.set_xticks(range(len(classes)), [
        f"{c}\ncalls/event " + " vs ".join(
            f"{s['classes'][c]['calls_per_event']['mean']:.2f}" for s in sides.values())
        for c in classes], fontsize=8)
    bottom.set_ylabel("% of the class's events")
    bottom.set_title(f"{data['events']:,} events at {data['rate']:g}/s, {data['fail_rate']:.0%} "
                     f"transient failures, outage {start:g}-{end:g} s; downstream calls while "
                     "it was down: " + ", ".join(f"{n} {s['outage_calls']:,}"
                                                 for n, s in sides.items()), fontsize=9)
    bottom.legend(fontsize=8)
    return fig


DRAWERS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "isolation": _isolation, "overhead": _overhead, "ingest": _ingest, "batch": _batch,
    "dlq": _dlq, "seed": _seed, "io": _io,
}
