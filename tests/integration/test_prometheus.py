"""A real Prometheus (Debian's ``prometheus``) scrapes the exporter that `pipeline up`
prints, with the shipped alert rules loaded: the target is up, every rule evaluates,
and every series a rule reads is there. The exporter alone serves them: nothing here
uses the API's token to scrape (ingest counters live in the state Redis)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.local.embedded import free_port
from tests.integration.support import alive, wait_for
from tests.integration.test_stack import Up, read_env_file

PROMETHEUS_READY_TIMEOUT_S = 60.0  # Prometheus answering, its target up and rules loaded
SERIES_TIMEOUT_S = 120.0  # every series the rules read has been scraped
# Tiers of the stack: bulk bounded and slow to drain, so admission refuses (tier_full).
CONFIG = ('handler_modules = ["pipeline.demo"]\n'
          "[tiers.critical]\nconcurrency = 1\nprefetch_multiplier = 1\n"
          "[tiers.standard]\nconcurrency = 1\nmax_retries = 1\nbackoff_base_s = 0.1\n"
          "backoff_max_s = 0.2\n"
          '[tiers.bulk]\nconcurrency = 1\nprefetch_multiplier = 1\nmax_depth = 2\n'
          'overflow = "reject"\n'
          '[[rules]]\ntype = "analytics.*"\ntier = "bulk"\n')
RULES = Path(__file__).parents[2] / "ops" / "prometheus" / "alerts.yml"
SELECTOR = re.compile(r"\b(pipeline_[a-z_]+)(\{[^}]*\})?")


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's prometheus is missing under CI (.ci/run installs it)")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    return found


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def selectors(expr: str) -> list[str]:
    """Every ``metric{labels}`` a rule's expression reads."""
    return [name + (labels or "") for name, labels in SELECTOR.findall(expr)]


def run(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def test_prometheus_evaluates_every_alert_rule_on_series_the_exporter_serves(
    tmp_path: Path,
) -> None:
    binary = prometheus_binary()
    up = Up(tmp_path, config=CONFIG)
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        up.banner_value("metrics")
        for tier in ("critical", "standard", "bulk"):
            up.wait_ready(tier)
        values = read_env_file(up.state / "stack.env")
        env = {**up.env, **values}
        exporter = urllib.parse.urlsplit(values["PIPELINE_EXPORTER_URL"])
        port = free_port()
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "pipeline-exporter",
                                "static_configs": [{"targets": [exporter.netloc]}]}],
        }))
        with (tmp_path / "prometheus.log").open("wb") as log:
            prometheus = subprocess.Popen(
                [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"

        # Traffic that gives every rule its series: accepted, invalid and refused events,
        # retries and dead letters.
        lines = [json.dumps({"type": "demo.ok", "source": "prom"}),
                 json.dumps({"type": "Not.Valid", "source": "prom"}),
                 *(json.dumps({"type": "demo.flaky", "source": "prom",
                               "payload": {"fail_rate": 1.0}}) for _ in range(3)),
                 json.dumps({"type": "demo.fail", "source": "prom"}),
                 *(json.dumps({"type": "demo.slow", "source": "prom", "tier": "bulk",
                               "payload": {"ms": 3000}}) for _ in range(8))]
        sent = run(env, "send", "-", stdin="\n".join(lines))
        assert "tier_full" in sent.stdout, sent.stdout + sent.stderr

        def target_up() -> bool:
            targets = api(base, "/api/v1/targets")["activeTargets"]
            return bool(targets) and all(t["health"] == "up" for t in targets)

        wait_for(lambda: _answers(base) and target_up(), PROMETHEUS_READY_TIMEOUT_S,
                 "Prometheus up with its exporter target up", 0.5)
        rules = [r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]]
        assert len(rules) == len([r for g in yaml.safe_load(RULES.read_text())["groups"]
                                  for r in g["rules"]])

        def missing() -> list[str]:
            gaps = []
            for rule in rules:
                for selector in selectors(rule["query"]):
                    if not api(base, "/api/v1/series", **{"match[]": selector}):
                        gaps.append(f"{rule['name']}: {selector}")
            return gaps

        last: list[list[str]] = []

        def complete() -> bool:
            last.append(missing())
            return not last[-1]

        try:
            wait_for(complete, SERIES_TIMEOUT_S, "every series the alert rules read", 2.0)
        except AssertionError:
            raise AssertionError(f"no series for: {last[-1]}") from None
        evaluated = [r for g in api(base, "/api/v1/rules")["groups"] for r in g["rules"]]
        assert [r["name"] for r in evaluated if r["health"] != "ok"] == []
    finally:
        if prometheus is not None and prometheus.poll() is None:
            prometheus.send_signal(signal.SIGTERM)
            prometheus.wait(30)
        up.stop()
        time.sleep(0.2)
        leftovers = [pid for pid in up.seen if alive(pid)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert leftovers == []


def _answers(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False
