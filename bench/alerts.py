"""Which of ``ops/prometheus/alerts.yml`` would have fired during a benchmark run.

The run is scraped every ``interval_s`` as Prometheus would (the exporter's
registry, in-process). Afterwards the samples become the ``input_series`` of a
``promtool test rules`` file whose rule file is the shipped alerts file, and
four PromQL queries over ``ALERTS`` at the end of the run ask, per alert, when
it was first and last pending and firing. The test expects nothing, so promtool
fails and prints what it got; :func:`parse_got` reads that. The rules'
``for:`` durations and range windows are evaluated by Prometheus's own engine.

No promtool on PATH (Debian package ``prometheus``): the result says so.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Recorder", "evaluate", "max_for_s", "parse_got", "rule_metric_names",
           "values_notation"]

RULES_FILE = Path(__file__).parent.parent / "ops" / "prometheus" / "alerts.yml"
PROMTOOL_TIMEOUT_S = 120.0  # one evaluation of a few minutes of samples takes seconds
_METRIC = re.compile(r"\b(pipeline_[a-z0-9_]+)")
_GOT = re.compile(r"\{([^}]*)\} ([-+0-9.eE]+|NaN|[-+]Inf)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def rule_metric_names(rules_file: Path = RULES_FILE) -> set[str]:
    """Metric names the alert expressions read (histogram/counter suffixes included)."""
    doc = yaml.safe_load(rules_file.read_text())
    names: set[str] = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            names.update(_METRIC.findall(str(rule.get("expr", ""))))
    return names


def max_for_s(rules_file: Path = RULES_FILE) -> float:
    """The longest ``for:`` of the alert rules, in seconds."""
    doc = yaml.safe_load(rules_file.read_text())
    units = {"s": 1, "m": 60, "h": 3600}
    longest = 0.0
    for group in doc["groups"]:
        for rule in group["rules"]:
            text = str(rule.get("for", "0s"))
            longest = max(longest, float(text[:-1]) * units[text[-1]])
    return longest


class Recorder:
    """Scrape texts collected at a fixed interval, kept only for the rules' metrics."""

    def __init__(self, interval_s: float, names: set[str] | None = None) -> None:
        self.interval_s = interval_s
        self.names = names if names is not None else rule_metric_names()
        self.steps = 0
        self.series: dict[str, dict[int, float]] = {}  # selector -> step -> value

    def add(self, text: str) -> None:
        """Record one scrape as the next step."""
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in self.names or sample.name.endswith("_created"):
                    continue
                self.series.setdefault(selector(sample.name, sample.labels), {})[
                    self.steps] = float(sample.value)
        self.steps += 1


def selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def values_notation(points: dict[int, float], steps: int) -> str:
    """promtool's ``values`` string: one entry per step, ``_`` where nothing was scraped."""
    out = []
    for step in range(steps):
        value = points.get(step)
        if value is None:
            out.append("_")
        elif math.isnan(value):
            out.append("NaN")
        else:
            out.append(repr(value))
    return " ".join(out)


def parse_got(output: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """promtool's failure output -> expression -> [(labels, value)] it got."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    expr = None
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("expr: "):
            match = re.match(r'expr: "(.*)", time:', stripped)
            expr = match.group(1).replace('\\"', '"') if match else None
        elif stripped.startswith("got: ") and expr is not None:
            found[expr] = [({k: v for k, v in _LABEL.findall(labels)}, float(value))
                           for labels, value in _GOT.findall(stripped)]
    return found


def evaluate(recorder: Recorder, workdir: Path, rules_file: Path = RULES_FILE
             ) -> dict[str, Any]:
    """Alerts pending and firing during the recorded run: ``{"alerts": [{alertname,
    labels, pending: [first_s, last_s] | None, firing: [...] | None}], ...}``; times
    are seconds since the first scrape."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return {"evaluated": False,
                "why": "promtool not found on PATH (Debian/Ubuntu package 'prometheus')"}
    step_s = recorder.interval_s
    end_s = (recorder.steps - 1) * step_s
    window = f"{int(end_s + step_s)}s:{int(step_s)}s" if step_s >= 1 else None
    assert window, "scrape interval must be at least 1 s"
    queries = {(state, edge): f'{fn}_over_time(timestamp(ALERTS{{alertstate="{state}"}})'
                              f"[{window}])"
               for state in ("pending", "firing") for edge, fn in (("first", "min"),
                                                                   ("last", "max"))}
    test = {
        "rule_files": [str(rules_file.resolve())],
        "evaluation_interval": f"{int(step_s)}s",
        "tests": [{
            "interval": f"{int(step_s)}s",
            "input_series": [{"series": name, "values": values_notation(points, recorder.steps)}
                             for name, points in sorted(recorder.series.items())],
            "promql_expr_test": [{"expr": q, "eval_time": f"{int(end_s)}s", "exp_samples": []}
                                 for q in queries.values()],
        }],
    }
    path = workdir / "alerts-test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True,
                          text=True, timeout=PROMTOOL_TIMEOUT_S, check=False)
    output = done.stdout + done.stderr
    if done.returncode not in (0, 1) or (done.returncode == 1 and "got:" not in output
                                         and "exp: nil" not in output):
        raise RuntimeError(f"promtool test rules failed: {output[-2000:]}")
    got = parse_got(output)
    alerts: dict[str, dict[str, Any]] = {}
    for (state, edge), query in queries.items():
        for labels, ts in got.get(query, []):
            labels = {k: v for k, v in labels.items() if k != "alertstate"}
            key = selector(labels.get("alertname", "?"), labels)
            entry = alerts.setdefault(key, {"alertname": labels.get("alertname"),
                                            "labels": labels, "pending": None, "firing": None})
            span = entry[state] or [None, None]
            span[0 if edge == "first" else 1] = ts
            entry[state] = span
    return {"evaluated": True, "promtool": promtool, "interval_s": step_s,
            "duration_s": end_s, "series": len(recorder.series),
            "alerts": sorted(alerts.values(), key=lambda a: (a["alertname"], str(a["labels"])))}
