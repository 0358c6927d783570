"""Alert rules and the Grafana dashboard: valid PromQL, tested alerts, documented names.

The promtool checks run when promtool is on PATH (Debian package ``prometheus``)
and are skipped otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "ops" / "prometheus" / "tests" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "pipeline.json"
DOC = ROOT / "docs" / "observability.md"
METRIC = re.compile(r"\bpipeline_[a-z_]+")
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(pipeline_[a-z_]+)`", DOC.read_text(), re.MULTILINE))


def used_metric(name: str) -> str:
    """A histogram's series name without its suffix."""
    return re.sub(r"_(bucket|count|sum)$", "", name)


def test_every_metric_the_rules_and_dashboard_use_is_documented() -> None:
    used = {used_metric(m) for rule in alert_rules() for m in METRIC.findall(str(rule["expr"]))}
    used |= {used_metric(m) for expr in dashboard_exprs() for m in METRIC.findall(expr)}
    assert used, "no pipeline_ metric found in the rules or the dashboard"
    assert used <= documented_metrics(), used - documented_metrics()


def test_every_alert_names_a_runbook_section_that_exists() -> None:
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", DOC.read_text(), re.MULTILINE)}
    for rule in alert_rules():
        runbook = str(rule["annotations"]["runbook"])  # type: ignore[index]
        assert runbook.split("#", 1)[1] in anchors, f"{rule['alert']}: {runbook}"


def test_every_alert_has_a_promtool_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", ALERT_TESTS.read_text()))
    assert {str(r["alert"]) for r in alert_rules()} <= tested


@needs_promtool
def test_promtool_accepts_the_alert_rules() -> None:
    proc = subprocess.run([str(PROMTOOL), "check", "rules", str(ALERTS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    proc = subprocess.run([str(PROMTOOL), "test", "rules", str(ALERT_TESTS)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [{"record": f"dashboard:query_{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$tier", ".*")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([str(PROMTOOL), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
