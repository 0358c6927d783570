"""``pipeline up``: the local stack as child processes, supervised.

Starts an embedded broker when no ``PIPELINE_BROKER_URL`` is configured, then
one worker per tier (``pipeline worker --tier T``). A child that dies is
reported and restarted; Ctrl-C or SIGTERM stops the workers with Celery's warm
shutdown (SIGTERM), then the broker, and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click

from pipeline.config import load_settings
from pipeline.embedded import EmbeddedServer, start_server
from pipeline.errors import ConfigError

__all__ = ["run_stack"]

POLL_S = 0.5  # supervision loop period
WARM_SHUTDOWN_TIMEOUT_S = 30.0  # how long workers get to finish running tasks
RESTART_BACKOFF_MAX_S = 30.0  # longest wait before restarting a crash-looping child
DEMO_RATE_PER_S = 20  # events per second the --demo sender publishes


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    log_path: Path | None = None
    log_file: object = field(default=None, repr=False)

    def start(self, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(self.argv, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        handle.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


def run_stack(*, config_file: str | None, with_demo: bool, state_dir: Path) -> int:
    env = dict(os.environ)
    if config_file:
        env["PIPELINE_CONFIG"] = str(Path(config_file).resolve())
    if with_demo:
        modules = json.loads(env.get("PIPELINE_HANDLER_MODULES", "[]") or "[]")
        if "pipeline.demo" not in modules:
            env["PIPELINE_HANDLER_MODULES"] = json.dumps([*modules, "pipeline.demo"])
    os.environ.update(env)
    try:
        settings = load_settings()
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        return 2

    state_dir = state_dir.resolve()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server: EmbeddedServer | None = None
    if not settings.broker_url:
        server = start_server(state_dir / "broker")
        env["PIPELINE_BROKER_URL"] = server.url
        os.environ["PIPELINE_BROKER_URL"] = server.url

    python = sys.executable
    children = [Child(f"worker-{tier}", [python, "-m", "pipeline", "worker", "--tier", tier])
                for tier in settings.tiers]
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for child in children:
        child.start(env, log_dir)
    _banner(env["PIPELINE_BROKER_URL"] if server else settings.effective_broker_url,
            children, log_dir, embedded=server is not None, with_demo=with_demo)

    sender = _DemoSender() if with_demo else None
    try:
        while not stopping:
            _supervise(children, env, log_dir)
            if sender is not None:
                sender.tick()
            time.sleep(POLL_S)
    finally:
        click.echo("stopping: warm shutdown of workers ...")
        for child in children:
            child.stop()
        deadline = time.monotonic() + WARM_SHUTDOWN_TIMEOUT_S
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                click.echo(f"{child.name} did not stop in time; killing it", err=True)
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait()
        if server is not None:
            server.stop()
        click.echo("stopped")
    return 0


def _supervise(children: list[Child], env: dict[str, str], log_dir: Path) -> None:
    now = time.monotonic()
    for child in children:
        proc = child.process
        if proc is not None and proc.poll() is None:
            continue
        if proc is not None and child.next_start == 0.0:
            child.restarts += 1
            delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** min(child.restarts, 5))
            child.next_start = now + delay
            click.echo(f"{child.name} exited with {proc.returncode}; restarting in {delay:.0f}s "
                       f"(log: {child.log_path})", err=True)
        if now >= child.next_start:
            child.next_start = 0.0
            child.start(env, log_dir)


def _banner(broker: str, children: list[Child], log_dir: Path, *, embedded: bool,
            with_demo: bool) -> None:
    lines = [
        "pipeline is up",
        f"  broker:   {broker}" + (f"  (embedded; data in {log_dir.parent})" if embedded else ""),
        f"  workers:  {', '.join(c.name for c in children)}",
        f"  logs:     {log_dir}",
        "  send one: echo '{\"type\": \"demo.ok\", \"source\": \"cli\"}' | "
        f"PIPELINE_BROKER_URL={broker} PIPELINE_HANDLER_MODULES='[\"pipeline.demo\"]' "
        "pipeline send -",
        f"  DLQ:      PIPELINE_BROKER_URL={broker} pipeline dlq list",
        f"  demo:     {'sending a mix of demo events' if with_demo else 'off (use --demo)'}",
        "  stop:     Ctrl-C",
    ]
    click.echo("\n".join(lines))


class _DemoSender:
    """Publishes a steady mix of demo events: mostly fine, some flaky, a few doomed."""

    MIX = (("demo.ok", 60), ("demo.slow", 15), ("demo.flaky", 15), ("demo.fail", 4),
           ("demo.invalid", 3), ("demo.typed", 3))

    def __init__(self) -> None:
        from pipeline.app import app
        from pipeline.runtime import runtime_for

        self.publisher = runtime_for(app).publisher
        self.types = [t for t, _ in self.MIX]
        self.weights = [w for _, w in self.MIX]

    def tick(self) -> None:
        for _ in range(int(DEMO_RATE_PER_S * POLL_S)):
            kind = random.choices(self.types, self.weights)[0]
            payload: dict[str, object] = {"ms": random.randint(10, 300), "fail_rate": 0.3,
                                          "user_id": random.randint(1, 10_000), "amount": 5}
            self.publisher.publish({"id": str(uuid.uuid4()), "type": kind, "source": "demo",
                                    "payload": payload})
