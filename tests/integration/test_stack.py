"""`pipeline up` as a user runs it: its printed URLs answer, its stack.env is private,
a crashed worker comes back, and SIGTERM leaves no process behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import pipeline.cli  # noqa: F401  (registers every command)
from pipeline.cli.base import cli
from pipeline.core.state import Keys
from tests.integration.support import alive, descendants, wait_for

STARTUP_TIMEOUT_S = 60.0  # banner and every worker ready
HTTP_TIMEOUT_S = 5.0  # one request to a service of the stack
SMALL_TOML = ('handler_modules = ["pipeline.demo"]\n'
              "[tiers.critical]\nconcurrency = 1\nprefetch_multiplier = 1\n"
              "[tiers.standard]\nconcurrency = 1\n")




def direct_children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except FileNotFoundError:
        return ""


class Up:
    """A `pipeline up` subprocess with its output in a file."""

    def __init__(self, tmp: Path, *extra: str, config: str | None = SMALL_TOML,
                 env: dict[str, str] | None = None, out: str = "up.out") -> None:
        """``config`` None: the built-in configuration; ``env`` adds variables."""
        args = []
        if config is not None:
            path = tmp / "small.toml"
            path.write_text(config)
            args = ["--config", str(path)]
        self.state = tmp / "state"
        self.out = tmp / out
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        self.env.update(env or {})
        with self.out.open("wb") as handle:
            # Its own process group, as a shell gives a foreground job: a test can send
            # the group a terminal's Ctrl-C.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "up", *args,
                 "--state-dir", str(self.state), *extra],
                env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[int] = set()

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def banner_value(self, label: str) -> str:
        found = wait_for(lambda: re.search(rf"^\s+{label}:\s+(\S+)", self.output(), re.M),
                         STARTUP_TIMEOUT_S, f"{label!r} in the banner")
        return found.group(1)

    def worker_log(self, tier: str) -> str:
        path = self.state / "logs" / f"worker-{tier}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, tier: str, times: int = 1) -> None:
        wait_for(lambda: self.worker_log(tier).count(" ready.") >= times, STARTUP_TIMEOUT_S,
                 f"worker {tier} ready x{times}")

    def children(self) -> set[int]:
        found = descendants(self.process.pid)
        self.seen |= found
        return found

    def stop(self) -> None:
        self.children()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(90)


@contextlib.contextmanager
def stacks_started(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    """A starter of `pipeline up [extra...]`; on exit stops every stack it started with
    SIGTERM and fails if any process one ever had survives."""
    started: list[Up] = []

    def start(*extra: str, **options: Any) -> Up:
        started.append(Up(tmp_path, *extra, out=f"up-{len(started)}.out", **options))
        return started[-1]

    try:
        yield start
    finally:
        for stack in started:
            stack.stop()
        time.sleep(0.2)
        leftovers = [pid for stack in started for pid in stack.seen if alive(pid)]
        for pid in leftovers:  # ours, by pid; reported below
            os.kill(pid, signal.SIGKILL)
        assert leftovers == [], f"processes left behind: {leftovers}"


@pytest.fixture
def start_up(tmp_path: Path) -> Iterator[Callable[..., Up]]:
    with stacks_started(tmp_path) as start:
        yield start


@pytest.fixture
def up(start_up: Callable[..., Up]) -> Up:
    return start_up()


def get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return int(response.status), response.read()


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values[key] = value.strip("'")
    return values


@pytest.mark.skipif("serve" not in cli.commands, reason="no `pipeline serve` in this install")
def test_pipeline_up_serves_the_printed_urls_and_a_private_stack_env(up: Up) -> None:
    api_url = up.banner_value("API")
    assert get(f"{api_url}/healthz")[0] == 200
    console = up.banner_value("console")
    assert console == f"{api_url}/console"
    status, login_page = get(f"{console}/login")
    assert status == 200
    assert b'name="token"' in login_page
    env_file = up.state / "stack.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = read_env_file(env_file)
    assert values["PIPELINE_API_URL"] == api_url
    token = values["PIPELINE_API_TOKEN"]
    assert f"PIPELINE_API_TOKEN={token}" in up.output()  # generated, printed once
    assert up.output().count(token) == 1

    up.wait_ready("standard")
    body = json.dumps({"type": "demo.ok", "source": "stack-test"}).encode()
    request = urllib.request.Request(f"{api_url}/events", data=body, method="POST", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        assert response.status == 202
        event_id = json.loads(response.read())["id"]
    client = redis.Redis.from_url(values["PIPELINE_BROKER_URL"])
    try:
        wait_for(lambda: client.hexists(Keys.demo_effects(), event_id), 30,
                 "the event sent over HTTP to be processed")
    finally:
        client.close()

    if "flower" in cli.commands:
        assert get(f"{up.banner_value('Flower')}/healthcheck")[0] == 200
        assert ":" in values["PIPELINE_FLOWER_BASIC_AUTH"]
    if "exporter" in cli.commands:
        status, metrics = get(up.banner_value("metrics"))
        assert status == 200
        assert b"pipeline_" in metrics

    up.stop()
    assert up.process.returncode == 0, up.output()[-2000:]
    assert not env_file.exists()  # it names a stack that is gone


def test_pipeline_up_restarts_a_crashed_worker(up: Up) -> None:
    up.banner_value("broker")
    up.wait_ready("critical")
    up.children()
    (first,) = [pid for pid in direct_children(up.process.pid)
                if cmdline(pid).endswith("worker --tier critical ")]
    os.kill(first, signal.SIGKILL)  # the worker's main process; its pool is orphaned

    wait_for(lambda: "worker-critical exited with -9; restarting" in up.output(), 20,
             "the crash to be reported")
    up.wait_ready("critical", times=2)
    now = [pid for pid in up.children() if cmdline(pid).endswith("worker --tier critical ")]
    assert now
    assert first not in now


def test_ctrl_c_stops_the_workers_before_the_broker(up: Up) -> None:
    broker = up.banner_value("broker")
    up.wait_ready("critical")
    up.wait_ready("standard")
    up.children()
    os.killpg(up.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    up.process.wait(90)

    assert up.process.returncode == 0, up.output()[-2000:]
    assert up.output().rstrip().endswith("stopped")
    for tier in ("critical", "standard"):
        assert "Warm shutdown" in up.worker_log(tier)
    # The broker did not get the terminal's SIGINT: `pipeline up` stopped it last.
    server_log = (up.state / "broker" / "server.log").read_text()
    assert "Received SIGTERM" in server_log, server_log[-1000:]
    assert "Received SIGINT" not in server_log
    assert broker.startswith("redis://127.0.0.1:")


def test_commands_find_the_stack_pipeline_up_runs_from_the_current_directory(
    up: Up, tmp_path: Path,
) -> None:
    up.banner_value("broker")
    up.wait_ready("critical")
    (tmp_path / ".pipeline-state").symlink_to(up.state)  # the default --state-dir
    broker = read_env_file(up.state / "stack.env")["PIPELINE_BROKER_URL"]

    def pipeline(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path,
                              env=up.env, capture_output=True, text=True, timeout=60)

    for args in (("status", "--json"), ("--state-dir", str(up.state), "status", "--json")):
        found = pipeline(*args)
        assert found.returncode == 0, found.stderr
        assert f"using the stack `pipeline up` (pid {up.process.pid}) runs from" in found.stderr
        assert broker in found.stderr
        tiers = {t["tier"]: t["workers_online"] for t in json.loads(found.stdout)["tiers"]}
        assert tiers["critical"] >= 1
    for args in (("dlq", "stats"), ("breaker", "status")):
        found = pipeline(*args)
        assert found.returncode == 0, found.stderr
        assert "using the stack" in found.stderr
        assert "no workers" not in found.stderr


def test_a_command_next_to_a_dead_stack_refuses_instead_of_reading_another_redis(
    tmp_path: Path,
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the `pipeline up` killed with SIGKILL
    state = tmp_path / ".pipeline-state"
    state.mkdir()
    (state / "stack.env").write_text(f"PIPELINE_UP_PID={dead.pid}\n"
                                     "PIPELINE_BROKER_URL=redis://127.0.0.1:1/0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    found = subprocess.run([sys.executable, "-m", "pipeline", "status"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
    assert found.returncode == 2, found.stderr
    assert f"`pipeline up` (pid {dead.pid}) that wrote" in found.stderr
    assert "is gone" in found.stderr
    assert "PIPELINE_BROKER_URL" in found.stderr


def test_a_command_that_finds_no_workers_says_which_broker_it_read(
    redis_url: str, tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PIPELINE_BROKER_URL"] = redis_url.rsplit("/", 1)[0] + "/15"  # nobody works here
    for args in (("status",), ("dlq", "list"), ("dlq", "stats"), ("breaker", "status")):
        found = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=60)
        assert found.returncode in (0, 1), found.stderr
        assert f"note: no workers on broker {env['PIPELINE_BROKER_URL']}" in found.stderr, args


def test_sigkill_of_pipeline_up_leaves_no_child_alive(up: Up) -> None:
    up.banner_value("broker")
    for tier in ("critical", "standard"):
        up.wait_ready(tier)
    children = up.children()
    assert len(children) >= 4  # broker, services, workers and their pools
    os.kill(up.process.pid, signal.SIGKILL)  # no chance to stop anything itself
    up.process.wait(10)
    survivors = wait_for(lambda: not [p for p in children if alive(p)] or None, 60,
                         "every child of the SIGKILLed stack to exit", 0.5)
    assert survivors


def test_a_second_pipeline_up_on_the_same_state_dir_refuses_naming_the_first(
    start_up: Callable[..., Up],
) -> None:
    first = start_up()
    api_url = first.banner_value("broker") and read_env_file(
        first.state / "stack.env").get("PIPELINE_API_URL", "")
    second = subprocess.run(
        [sys.executable, "-m", "pipeline", "up", "--state-dir", str(first.state)],
        env=first.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert f"is in use by `pipeline up` (pid {first.process.pid})" in second.stderr
    if api_url:
        assert api_url in second.stderr
    assert first.process.poll() is None  # the first stack is untouched
