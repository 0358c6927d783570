"""Real tier workers and servers (exporter, Flower) as subprocesses, and a publisher
in the test process."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.state import Keys
from pipeline.dlq.record import DeadLetterRecord
from pipeline.local.embedded import free_port
from pipeline.producer.results import PublishResult
from pipeline.worker.runtime import Runtime, runtime_for

WORKER_READY_TIMEOUT_S = 30.0  # a worker that is not ready by then fails the test
SERVER_READY_TIMEOUT_S = 30.0  # an exporter or Flower not answering by then fails the test
T = TypeVar("T")

IO_MODULES = ("pipeline.demo", "tests.integration.io_handlers")  # handlers of the pool tests

# A test config: fast retries, short limits, demo handlers loaded.
FAST_TOML = """
handler_modules = {modules}
default_tier = "standard"
broker_visibility_timeout_s = {vt}
retry_poll_interval_s = 0.1

[broker_transport_options]
unacked_restore_interval = 1
unacked_restore_throttle = 1

[tiers.critical]
queue = "{prefix}critical"
concurrency = 1
prefetch_multiplier = 1
max_retries = 3
backoff_base_s = 0.1
backoff_max_s = 0.3
soft_time_limit_s = {soft}
time_limit_s = {hard}
retry_budget_ratio = {budget}

[tiers.standard]
queue = "{prefix}standard"
concurrency = 2
prefetch_multiplier = 1
max_retries = 2
backoff_base_s = 0.1
backoff_max_s = 0.3
soft_time_limit_s = {soft}
time_limit_s = {hard}
retry_budget_ratio = {budget}
max_deliveries = 2

[tiers.bulk]
queue = "{prefix}bulk"
concurrency = 1
prefetch_multiplier = 1
max_retries = 1
backoff_base_s = 60
backoff_max_s = 120
soft_time_limit_s = {soft}
time_limit_s = {hard}
retry_budget_ratio = {budget}

[[rules]]
type = "demo.*"
source = "vip-*"
tier = "critical"

[[rules]]
source = "batch-*"
tier = "bulk"
"""


# A tier whose soft (0.5 s) and hard (1.5 s) time limits tests can hit quickly.
SLOW_TIER = """
[tiers.slow]
queue = "slow"
concurrency = 1
prefetch_multiplier = 1
max_retries = 1
backoff_base_s = 0.1
backoff_max_s = 0.2
soft_time_limit_s = 0.5
time_limit_s = 1.5
"""


def wait_for(predicate: Callable[[], T | None], timeout_s: float, what: str,
             interval_s: float = 0.05) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Worker:
    tier: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> Worker:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.tier} exited:\n{self.log()[-3000:]}")
            return " ready." in self.log()

        wait_for(ready, WORKER_READY_TIMEOUT_S, f"worker {self.tier} to be ready")
        return self

    def dump_stacks(self, timeout_s: float = 3.0) -> str:
        """Every thread's stack in the main process (Celery's SIGUSR1 handler writes
        them, with their locals, to the log): where a stuck worker waits."""
        if self.process.poll() is not None:
            return f"worker {self.tier} exited ({self.process.returncode})"
        start = len(self.log())
        self.process.send_signal(signal.SIGUSR1)
        with contextlib.suppress(AssertionError):
            wait_for(lambda: "LOCAL VARIABLES" in self.log()[start:], timeout_s, "the dump")
            time.sleep(0.5)  # the rest of the threads
        lines = self.log()[start:].splitlines()
        kept = [line for i, line in enumerate(lines)
                if line.startswith('  File "') or (i and lines[i - 1].startswith('  File "'))
                or (i + 1 < len(lines) and lines[i + 1].startswith("=====")
                    and line.strip() and not line.startswith(("=", "LOCAL VARIABLES")))]
        return "\n".join(kept)

    def child_pids(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def kill_all(self) -> None:
        """SIGKILL the worker's main process and its pool children (a node crash)."""
        children = self.child_pids()
        self.process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_all()


@dataclass
class Stack:
    """A config file, a publisher in this process and workers in subprocesses."""

    url: str
    config_path: Path
    tmp: Path
    env_extra: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    rt: Runtime = field(init=False)

    def __post_init__(self) -> None:
        settings = load_settings(self.config_path, broker_url=self.url,
                                 **self._overrides_from_env_extra())
        self.rt = runtime_for(create_app(settings, main=f"test-{self.tmp.name}"))

    def _overrides_from_env_extra(self) -> dict[str, Any]:
        return {"state_url": self.env_extra["PIPELINE_STATE_URL"]} \
            if "PIPELINE_STATE_URL" in self.env_extra else {}

    @property
    def state(self) -> redis.Redis:
        return self.rt.state

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update(PIPELINE_BROKER_URL=self.url, PIPELINE_CONFIG=str(self.config_path))
        env.update(self.env_extra)
        return env

    def start_worker(self, tier: str, *extra: str, wait: bool = True,
                     env: dict[str, str] | None = None) -> Worker:
        """A worker for ``tier``; ``env`` adds variables to this one worker's."""
        log_path = self.tmp / f"worker-{tier}-{len(self.workers)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "worker", "--tier", tier,
                 "--without-gossip", "--without-mingle", *extra],
                env={**self.env(), **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
            )
        worker = Worker(tier, process, log_path)
        self.workers.append(worker)
        return worker.wait_ready() if wait else worker

    def start_workers(self, *tiers: str) -> list[Worker]:
        """One worker per tier, started together (they boot in parallel), all ready."""
        started = [self.start_worker(tier, wait=False) for tier in tiers]
        return [w.wait_ready() for w in started]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()

    def publish(self, type: str, source: str = "tests", **fields: Any) -> PublishResult:
        return self.rt.publisher.publish({"type": type, "source": source, **fields})

    def effects(self, key: str) -> int:
        return int(self.state.hget(Keys.demo_effects(), key) or 0)

    def dlq_for(self, event_id: str) -> list[DeadLetterRecord]:
        return [r for r in self.rt.dlq.records() if r.event_id == event_id]

    def wait_dlq(self, event_id: str, timeout_s: float = 20.0) -> DeadLetterRecord:
        records = wait_for(lambda: self.dlq_for(event_id), timeout_s, f"DLQ record for {event_id}")
        return records[0]

    def wait_effect(self, key: str, timeout_s: float = 20.0) -> int:
        return wait_for(lambda: self.effects(key), timeout_s, f"effect of {key}")


def write_config(path: Path, *, prefix: str = "", vt: float = 30.0, soft: float = 4.0,
                 hard: float = 5.0, budget: float = 0.0, extra: str = "",
                 handler_modules: Sequence[str] = ("pipeline.demo",)) -> Path:
    """The test config; ``budget`` is the tiers' retry_budget_ratio (0: off, so tests that
    fail many events on purpose are not throttled by it); ``handler_modules`` are the
    modules the workers import for their handlers."""
    path.write_text(FAST_TOML.format(prefix=prefix, vt=vt, soft=soft, hard=hard, budget=budget,
                                     modules=json.dumps(list(handler_modules))) + extra)
    return path


def breaker_toml(open_s: float, name: str = "demo-api") -> str:
    """A breaker the tests can open quickly: 5 failures in a row (or half of 10 calls
    in 10 s); one probe after ``open_s``."""
    return f"""
[breakers.{name}]
consecutive_failures = 5
min_calls = 10
failure_ratio = 0.5
window_s = 10
open_s = {open_s}
half_open_probes = 1
"""


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc), to check none outlives a stop."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in map(int, children):
            found |= {child} | descendants(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def start_server(stack: Stack, name: str, args: list[str], env: dict[str, str],
                 probe: str) -> Server:
    port = free_port()
    log_path = stack.tmp / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--port", str(port)],
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(process, port, log_path)

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"{name} exited:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url(probe), timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    wait_for(answers, SERVER_READY_TIMEOUT_S, f"{name} to answer", interval_s=0.2)
    return server


def stop_server(server: Server) -> None:
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
