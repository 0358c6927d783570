"""README.md, executed against one real `pipeline up --demo`.

The stack is started as the README's first block says, from a fresh directory,
and the other commands run from that directory without sourcing its stack.env,
as a new user in a second terminal would. Every fenced block and every inline
command of the README is either run here, with the claims printed next to it
checked, or listed in :data:`RUN_ELSEWHERE` with what runs it instead; a block or
command that is neither fails :func:`test_every_readme_block_and_command_is_accounted_for`.

Substitutions, each because the machine is shared: the tiers run one pool process
each (``PIPELINE_TIERS__<T>__CONCURRENCY=1``), and `pipeline serve --port 8000` gets a
free port. The install half of the first block is this suite's own environment
(an editable install of this checkout, checked below); `bash .ci/run` does it from
scratch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import pipeline
from pipeline.local.demotraffic import DEMO_DB, DOOMED_MAX
from pipeline.local.embedded import free_port
from tests.integration.support import alive, descendants, wait_for
from tests.integration.test_stack import read_env_file

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
TIERS = ("critical", "high", "standard", "bulk")
ONE_PROCESS_EACH = {f"PIPELINE_TIERS__{t.upper()}__CONCURRENCY": "1" for t in TIERS}
STARTUP_TIMEOUT_S = 90.0  # the banner and every tier's worker ready
COMMAND_TIMEOUT_S = 120.0  # one documented command
INSPECT_TIMEOUT_S = 3.0  # one remote-control round trip
INSTALL_STEPS = ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -e ."]
COMMAND = re.compile(r"^(pipeline|celery|python3?|bash|docker|kubectl|curl) ")

# What a fenced block contains -> the test that runs it here.
BLOCKS = {
    "pipeline up --demo": "readme_stack",
    "python -m pytest": None,  # the suite itself: `bash .ci/run` runs it
    "@handler(": "test_readme_quick_tour_publishes_to_the_critical_tier",
    "publish_many(events)": "test_readme_publish_many_reports_one_result_per_event",
    "pipeline send events.ndjson": "test_readme_pipeline_send_prints_the_counts_and_the_bad_line",
    "$PIPELINE_API_URL/events/batch": "test_readme_http_block_accepts_dedupes_and_batches",
    "[tiers.partner-sync]":
        "tests/unit/test_pools.py::test_the_readmes_pool_block_is_a_tier_config_check_accepts",
}
RUN_HERE = {  # inline commands -> the test that runs them here
    "pipeline up": "readme_stack",
    "pipeline serve": "readme_stack",  # `pipeline up` runs it
    "pipeline serve --port 8000":
        "test_readme_pipeline_serve_on_its_own_dedupes_and_refuses_a_batch_over_the_cap",
    "pipeline status": "test_readme_inline_commands_find_the_stack_from_its_directory",
    "pipeline dlq list": "test_readme_inline_commands_find_the_stack_from_its_directory",
    "pipeline dlq stats": "test_readme_inline_commands_find_the_stack_from_its_directory",
    "pipeline breaker status": "test_readme_inline_commands_find_the_stack_from_its_directory",
    "pipeline dlq replay --fingerprint FP":
        "test_readme_inline_commands_find_the_stack_from_its_directory",
    "pipeline worker --tier critical": "readme_stack",  # what `pipeline up` runs per tier
    "celery -A pipeline.app worker -Q critical -c 4 -n critical@%h":
        "test_readme_plain_celery_worker_consumes_critical_with_the_tiers_settings",
}
RUN_ELSEWHERE = {
    "bash .ci/run": "CI itself",
    "bash ops/check.sh": ".ci/run (offline checks of compose, k8s, Prometheus)",
    "docker compose up -d --build": "needs Docker; validated offline by ops/check.sh",
    "kubectl apply -k ops/k8s": "needs a cluster; validated offline by ops/check.sh",
    "python -m tools.docgen": "tests/unit/test_config_docs.py",
    "python -m bench <scenario>": ".ci/run (--quick variants; full runs take minutes)",
    "python -m bench seed": ".ci/run (--quick)",
    "python -m bench report": ".ci/run (--quick)",
}


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)


def inline_commands(text: str) -> set[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return {span for span in re.findall(r"`([^`\n]+)`", prose) if COMMAND.match(span)}


def block(key: str) -> str:
    (found,) = [body for _, body in fenced_blocks(README) if key in body]
    return found


def claims(text: str) -> list[str]:
    """The comment lines of a block: what it says the commands print."""
    return [line[2:] for line in text.splitlines() if line.startswith("# ")]


@dataclass
class ReadmeStack:
    """`pipeline up --demo` in its own directory, and how to run commands beside it."""

    workdir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    seen: set[int] = field(default_factory=set)

    @property
    def stack_env(self) -> dict[str, str]:
        return read_env_file(self.workdir / ".pipeline-state" / "stack.env")

    def output(self) -> str:
        return (self.workdir / "up.out").read_text(errors="replace")

    def run(self, command: str | list[str], **env: str) -> subprocess.CompletedProcess[str]:
        argv = shlex.split(command) if isinstance(command, str) else command
        return subprocess.run(argv, cwd=self.workdir, env={**self.env, **env},
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)

    def json_of(self, command: str) -> Any:
        done = self.run(f"{command} --json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReadmeStack]:
    *install, command = [part.strip() for part in block("pipeline up --demo").split("&&")]
    assert install == INSTALL_STEPS
    assert Path(pipeline.__file__).resolve().is_relative_to(ROOT)  # this checkout, installed
    workdir = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(ONE_PROCESS_EACH)
    with (workdir / "up.out").open("wb") as out:
        process = subprocess.Popen(shlex.split(command), cwd=workdir, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    stack = ReadmeStack(workdir, env, process)
    try:
        logs = workdir / ".pipeline-state" / "logs"
        wait_for(lambda: all(" ready." in _read(logs / f"worker-{t}.log") for t in TIERS)
                 and "pipeline is up" in stack.output(), STARTUP_TIMEOUT_S, "the demo stack")
        stack.seen = descendants(process.pid)
        yield stack
    finally:
        stack.seen |= descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        process.wait(90)
        time.sleep(0.2)
        leftovers = [pid for pid in stack.seen if alive(pid)]
        for pid in leftovers:  # ours, by pid
            os.kill(pid, signal.SIGKILL)
        assert leftovers == [], f"processes left behind: {leftovers}"


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_every_readme_block_and_command_is_accounted_for() -> None:
    for _lang, body in fenced_blocks(README):
        keys = [key for key in BLOCKS if key in body]
        assert len(keys) == 1, f"README block run by no test (or by two): {body[:200]!r}"
    assert inline_commands(README) == set(RUN_HERE) | set(RUN_ELSEWHERE)


def test_readme_up_demo_serves_the_banners_urls_without_a_token_where_it_says(
    readme_stack: ReadmeStack,
) -> None:
    api = readme_stack.stack_env["PIPELINE_API_URL"]
    assert f"API:      {api}" in readme_stack.output()
    prose = " ".join(README.split())
    assert f"plus {DOOMED_MAX} events that fail for good" in prose
    assert f"its own database of the embedded broker (db {DEMO_DB})" in prose
    assert readme_stack.stack_env["PIPELINE_BROKER_URL"].endswith(f"/{DEMO_DB}")
    for path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/redoc"):
        done = readme_stack.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                 f"{api}{path}"])
        assert done.stdout == "200", path


def test_readme_inline_commands_find_the_stack_from_its_directory(
    readme_stack: ReadmeStack,
) -> None:
    for command in ("pipeline status", "pipeline dlq list", "pipeline dlq stats",
                    "pipeline breaker status"):
        done = readme_stack.run(command)
        assert done.returncode == 0, (command, done.stderr)
        assert "using the stack `pipeline up`" in done.stderr, command
        assert "no workers" not in done.stderr, command
    status = readme_stack.json_of("pipeline status")
    assert {t["tier"]: t["workers_online"] for t in status["tiers"]} == dict.fromkeys(TIERS, 1)

    def invalid_group() -> str | None:
        groups = readme_stack.json_of("pipeline dlq stats")
        return next((g["fingerprint"] for g in groups if g["handler"] == "demo.invalid"), None)

    fingerprint = wait_for(invalid_group, 60, "the demo's dead letters grouped", 1.0)
    done = readme_stack.run(f"pipeline dlq replay --fingerprint {fingerprint}")
    assert done.returncode == 0, done.stderr
    assert "replayed" in done.stdout + done.stderr


CURL_WITH_STATUS = "curl() { command curl -w '\\n%{http_code}\\n' \"$@\"; echo '---'; }"


def replies_of(done: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(body, HTTP status) of each curl a script ran through :data:`CURL_WITH_STATUS`."""
    assert done.returncode == 0, done.stderr
    parts = [part.strip().rsplit("\n", 1) for part in done.stdout.split("---\n")[:-1]]
    return [(body, code) for body, code in parts]


def test_readme_http_block_accepts_dedupes_and_batches(readme_stack: ReadmeStack) -> None:
    text = block("$PIPELINE_API_URL/events/batch")
    expected = json.loads(claims(text)[0])
    source_env, *_ = text.splitlines()
    single, batch = [part for part in re.split(r"^#.*\n", text, flags=re.M) if part.strip()]
    first_curl = "curl " + single.split("curl ", 1)[1]
    write_ndjson(readme_stack.workdir / "batch.ndjson", 1000, bad_line=17)
    script = "\n".join(["set -e", CURL_WITH_STATUS, single,
                        first_curl,  # the README's "the same id again"
                        batch])
    (body1, code1), (body2, code2), (body3, code3) = replies_of(
        readme_stack.run(["bash", "-c", script]))
    assert source_env.startswith("set -a; . .pipeline-state/stack.env; set +a")
    assert (code1, json.loads(body1)) == ("202", expected)
    assert (code2, json.loads(body2)) == ("200", {**expected, "outcome": "duplicate"})
    batch_reply = json.loads(body3)
    assert code3 == "207"
    assert (batch_reply["accepted"], batch_reply["duplicate"], batch_reply["rejected"]) == \
        (998, 1, 1)
    assert len(batch_reply["results"]) == 1000

    def handled() -> bool:
        return expected["id"] in readme_stack.json_of("pipeline demo report --ids")["ids"]

    wait_for(handled, 60, "the README's reward event handled by the demo", 1.0)
    dead = readme_stack.json_of("pipeline dlq list")
    assert expected["id"] not in {r["event"]["id"] for r in dead}


def test_readme_pipeline_serve_on_its_own_dedupes_and_refuses_a_batch_over_the_cap(
    readme_stack: ReadmeStack,
) -> None:
    """`pipeline serve --port 8000` (a free port here) beside the stack, with a token of
    its own: the README's event is a duplicate there too (same broker), and a batch
    over api_max_batch gets 413."""
    text = block("$PIPELINE_API_URL/events/batch")
    single, batch = [part for part in re.split(r"^#.*\n", text, flags=re.M) if part.strip()]
    port = free_port()
    serve = next(c for c in RUN_HERE if c.startswith("pipeline serve --port"))
    script = "\n".join([
        "set -e", CURL_WITH_STATUS,
        "export PIPELINE_API_TOKEN=readme-test-token-0123456789",
        f"{serve.replace('8000', str(port))} & SERVE=$!",
        "trap 'kill $SERVE' EXIT",
        f"export PIPELINE_API_URL=http://127.0.0.1:{port}",
        "until command curl -sf $PIPELINE_API_URL/healthz >/dev/null; do sleep 0.2; done",
        "curl " + single.split("curl ", 1)[1], batch])
    write_ndjson(readme_stack.workdir / "batch.ndjson", 5001, bad_line=17)
    (body1, code1), (_, code2) = replies_of(readme_stack.run(["bash", "-c", script]))
    assert (code1, json.loads(body1)["outcome"]) == ("200", "duplicate")
    assert code2 == "413"


def write_ndjson(path: Path, lines: int, *, bad_line: int) -> None:
    """``lines`` analytics events: the last repeats the first, ``bad_line`` is invalid."""
    events = [json.dumps({"id": str(uuid.uuid4()), "type": "analytics.tracked",
                          "source": "readme", "payload": {"n": n}}) for n in range(lines - 1)]
    events.append(events[0])
    events[bad_line - 1] = json.dumps({"type": "Reward", "source": "readme"})
    path.write_text("\n".join(events) + "\n")


def test_readme_pipeline_send_prints_the_counts_and_the_bad_line(
    readme_stack: ReadmeStack,
) -> None:
    text = block("pipeline send events.ndjson")
    counts, bad = claims(text)
    write_ndjson(readme_stack.workdir / "events.ndjson", 10_000, bad_line=17)
    (command,) = [line for line in text.splitlines() if not line.startswith("#")]
    done = readme_stack.run(command)
    assert done.returncode in (0, 1), done.stderr
    printed = done.stdout + done.stderr
    assert counts in printed
    assert bad.removesuffix("...").strip() in printed


def run_python_block(stack: ReadmeStack, code: str, before: str, env: dict[str, str]) -> Any:
    """Runs a README Python block as a module of its own, with ``before`` run first;
    the block's publish results are printed as JSON."""
    path = stack.workdir / "readme_block.py"
    path.write_text(code)
    harness = (
        "import json, sys, pipeline\n"
        "results = []\n"
        "_publish = pipeline.publish\n"
        "def recording(event, *a, **k):\n"
        "    r = _publish(event, *a, **k)\n"
        "    results.append({**r.as_dict(), 'handlers': r.handlers})\n"
        "    return r\n"
        "pipeline.publish = recording\n"
        f"{before}\n"
        "scope = dict(globals(), __name__='readme_block')\n"
        "exec(compile(open(sys.argv[1]).read(), sys.argv[1], 'exec'), scope)\n"
        "results += [r.as_dict() for r in scope.get('results_of_block', [])]\n"
        "print(json.dumps(results, default=str))\n")
    done = stack.run([sys.executable, "-c", harness, str(path)], **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_readme_quick_tour_publishes_to_the_critical_tier(readme_stack: ReadmeStack) -> None:
    broker = readme_stack.stack_env["PIPELINE_BROKER_URL"]
    no_worker_db = broker.rsplit("/", 1)[0] + "/5"  # its handler runs on no worker here
    (result,) = run_python_block(readme_stack, block("@handler("), "",
                                 {"PIPELINE_BROKER_URL": no_worker_db})
    assert (result["tier"], result["outcome"]) == ("critical", "accepted")
    assert result["handlers"] == ["readme_block.credit_wallet"]


def test_readme_publish_many_reports_one_result_per_event(readme_stack: ReadmeStack) -> None:
    event_id = str(uuid.uuid4())
    reward = {"id": event_id, "type": "reward.granted", "source": "readme",
              "payload": {"user_id": 7, "amount": 1}}
    events = [reward, reward, {"type": "Reward", "source": "readme"}]
    code = block("publish_many(events)").replace(
        "results = pipeline.publish_many", "results_of_block = pipeline.publish_many")
    results = run_python_block(readme_stack, code, f"events = {events!r}",
                               readme_stack.stack_env)
    assert [r["outcome"] for r in results] == ["accepted", "duplicate", "rejected"]
    assert results[0]["tier"] == "critical"
    assert results[2]["reason"] == "invalid"
    assert {"field", "value", "message"} <= set(results[2]["errors"][0])


def test_readme_plain_celery_worker_consumes_critical_with_the_tiers_settings(
    readme_stack: ReadmeStack,
) -> None:
    command = next(c for c in RUN_HERE if c.startswith("celery "))
    out = readme_stack.workdir / "celery-critical.out"
    with out.open("wb") as handle:
        worker = subprocess.Popen(shlex.split(command), cwd=readme_stack.workdir,
                                  env=readme_stack.env, stdout=handle, stderr=subprocess.STDOUT)
    probe = Celery(broker=readme_stack.stack_env["PIPELINE_BROKER_URL"], set_as_current=False)
    try:
        wait_for(lambda: "[queues]" in out.read_text(errors="replace") or worker.poll(), 60,
                 "the plain celery worker's banner")  # it logs at WARNING: no "ready." line
        assert worker.poll() is None, out.read_text()[-3000:]
        banner = out.read_text(errors="replace")
        assert "using the stack `pipeline up`" in banner  # no stack.env sourced
        assert re.search(r"critical@\S+ v\d", banner)
        assert (".> pipeline:    tier 'critical' worker: prefetch multiplier 1, "
                "time limits 10 s soft, 15 s hard") in banner
        assert ".> critical " in banner  # its [queues] section

        def stats() -> dict[str, Any] | None:
            # The stack's own critical worker has the same node name: tell them by pid.
            replies = probe.control.broadcast("stats", reply=True, timeout=INSPECT_TIMEOUT_S)
            assert replies is not None  # reply=True: a list of replies
            return next((r for reply in replies for r in reply.values()
                         if r.get("pid") == worker.pid), None)

        mine = wait_for(stats, 30, "the plain worker's stats", 0.5)
        assert mine["prefetch_count"] == 4 * 1  # -c 4, the critical tier's multiplier 1
        assert mine["pool"]["timeouts"] == [10, 15]
        def handled() -> int:  # totals by task name, shadowed with the event type
            totals = (stats() or {}).get("total", {})
            return sum(n for name, n in totals.items() if name.startswith("pipeline.handle"))

        wait_for(handled, 90, "the plain worker to handle critical events", 1.0)
    finally:
        probe.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
