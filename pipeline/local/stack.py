"""``pipeline up``: the local stack as child processes, supervised.

Starts an embedded broker when no ``PIPELINE_BROKER_URL`` is configured, one
worker per tier (``pipeline worker --tier T``) and, when this install has those
commands, the ingest API (``pipeline serve``), Flower (``pipeline flower``) and
the exporter (``pipeline exporter``), each on its conventional port when free.
Credentials that are not configured are generated and printed once; the broker
URL, credentials, URLs and ports go to ``<state-dir>/stack.env`` (mode 0600) so
other ``pipeline`` commands can be pointed at the stack (:mod:`pipeline.local.banner`).

Children die with it whatever kills it (a parent-death signal), and the state
directory is locked while it runs: a second ``pipeline up`` on it refuses, naming
the running one (:mod:`pipeline.local.lifeline`).

``--demo`` loads the demo handlers and sends the demo mix
(:mod:`pipeline.local.demotraffic`) on its own database of the embedded broker
(:data:`DEMO_DB`), so its leftovers (pending retries, dead letters) never reach a
later stack started without ``--demo``. With a configured broker it uses that one.

A child that dies is reported and restarted (with backoff; what it left behind
in its process group is killed first). Ctrl-C or SIGTERM stops the API first,
then everything else with SIGTERM (Celery's warm shutdown for workers), then
the broker, and leaves no process behind (:mod:`pipeline.local.supervisor`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click

from pipeline.config.discovery import read_env_file
from pipeline.config.load import Settings, check_settings, load_settings
from pipeline.core.redisurl import redact
from pipeline.core.tokens import credentials
from pipeline.errors import ConfigError, FieldProblem
from pipeline.local.banner import Endpoints, banner, write_env_file
from pipeline.local.demotraffic import DEMO_DB, DemoSender
from pipeline.local.embedded import EmbeddedServer, free_port, start_server
from pipeline.local.lifeline import StateDirBusy, die_with_parent, lock_state_dir
from pipeline.local.supervisor import Child, say, stop_all, supervise

__all__ = ["run_stack"]

POLL_S = 0.5  # supervision loop period
HTTP_READY_TIMEOUT_S = 20.0  # how long the banner waits for the HTTP services to listen
LOCAL_HOST = "127.0.0.1"  # everything `pipeline up` serves binds loopback only
API_PORT = 8000  # conventional ports, used when free (else a free one)
FLOWER_PORT = 5555
EXPORTER_PORT = 9808
FLOWER_USER = "admin"  # user of the generated Flower basic-auth credentials
SECRET_BYTES = 24  # entropy of generated tokens and passwords
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where workers record metrics the exporter reads


def run_stack(*, config_file: str | None, with_demo: bool, state_dir: Path) -> int:
    env = _stack_env(config_file, with_demo)
    try:
        settings = _checked_settings()
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        return 2

    state_dir = state_dir.resolve()
    log_dir = state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env_file = state_dir / "stack.env"
    try:
        lock_state_dir(state_dir)  # held until this process exits, however
    except StateDirBusy as exc:
        click.echo(f"error: {exc}; it serves:\n{_running_stack(env_file)}\nstop it "
                   f"(kill {exc.pid}) or use another --state-dir", err=True)
        return 2
    stopping = _Stopping()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # HUP: terminal closed
        signal.signal(signum, stopping.on_signal)
    stack = _Stack()
    try:
        endpoints = _start(stack, settings, env, state_dir, log_dir, with_demo)
        write_env_file(env_file, env, endpoints)
        _wait_listening(stack.services, stopping)
        workers = [c.name for c in stack.children if c.name.startswith("worker-")]
        say(banner(endpoints, workers, log_dir, env_file, embedded=stack.server is not None,
                   with_demo=with_demo, demo_loaded="pipeline.demo" in settings.handler_modules))
        _supervise_until(stopping, stack.children, env, log_dir, with_demo)
    finally:
        _stop(stack, env_file)
    return 0


class _Stopping:
    """Whether SIGINT, SIGTERM or SIGHUP asked the stack to stop (a handler only sets it)."""

    def __init__(self) -> None:
        self.requested = False

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


@dataclass
class _Stack:
    """What has been started so far: what the stop step stops, however start ended."""

    server: EmbeddedServer | None = None
    services: list[Child] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)


def _stack_env(config_file: str | None, with_demo: bool) -> dict[str, str]:
    """This process's environment for the stack (the config file, the demo handlers),
    set in ``os.environ`` too: the children inherit it."""
    env = dict(os.environ)
    if config_file:
        env["PIPELINE_CONFIG"] = str(Path(config_file).resolve())
    if with_demo:
        modules = json.loads(env.get("PIPELINE_HANDLER_MODULES", "[]") or "[]")
        if "pipeline.demo" not in modules:
            env["PIPELINE_HANDLER_MODULES"] = json.dumps([*modules, "pipeline.demo"])
    os.environ.update(env)
    return env


def _checked_settings() -> Settings:
    """The settings, checked as ``pipeline config check`` does and for an embedded
    broker; raises :class:`ConfigError` naming every problem."""
    settings = load_settings()
    problems = check_settings(settings) + credentials(settings)[1]
    if not settings.broker_url and settings.state_url:  # the broker will be embedded
        problems = [p for p in problems if p.field != "state_url"]
        problems.append(FieldProblem(
            "state_url", redact(settings.state_url),
            "broker_url is unset, so `pipeline up` starts an embedded broker, and one "
            "atomic step moves work between the pipeline's state and the tier queues: "
            "both must be one Redis; unset state_url to use the broker"))
    if problems:
        raise ConfigError(problems)
    return settings


def _start(stack: _Stack, settings: Settings, env: dict[str, str], state_dir: Path,
           log_dir: Path, with_demo: bool) -> Endpoints:
    """The embedded broker (when none is configured), the services and one worker per
    tier, each recorded in ``stack`` as it starts; their endpoints."""
    if not settings.broker_url:
        # Its own session: a terminal's Ctrl-C must not stop the broker before the
        # workers' warm shutdown has returned their prefetched messages to it.
        stack.server = start_server(state_dir / "broker", new_session=True,
                                    preexec_fn=die_with_parent)
        env["PIPELINE_BROKER_URL"] = _broker_url(stack.server, with_demo)
        os.environ["PIPELINE_BROKER_URL"] = env["PIPELINE_BROKER_URL"]
    endpoints = Endpoints(env["PIPELINE_BROKER_URL"] if stack.server
                          else settings.effective_broker_url)
    python = sys.executable
    stack.services = _services(python, env, endpoints)
    stack.children = [*stack.services,
                      *(Child(f"worker-{tier}", [python, "-m", "pipeline", "worker",
                                                 "--tier", tier])
                        for tier in settings.tiers)]
    if any(c.name == "exporter" for c in stack.services) and not env.get(MULTIPROC_ENV):
        _share_metrics_dir(state_dir / "metrics", stack.children)
    for child in stack.children:
        child.start(env, log_dir)
    return endpoints


def _supervise_until(stopping: Callable[[], bool], children: list[Child], env: dict[str, str],
                     log_dir: Path, with_demo: bool) -> None:
    """Restart what dies (and send the demo mix) until a signal asks the stack to stop."""
    sender = DemoSender() if with_demo else None
    while not stopping():
        supervise(children, env, log_dir)
        if sender is not None:
            sender.tick(POLL_S)
        time.sleep(POLL_S)


def _stop(stack: _Stack, env_file: Path) -> None:
    """The API first, then everything else (warm shutdown of workers), then the broker."""
    say("stopping: the API first, then warm shutdown of workers ...")
    stop_all([c for c in stack.services if c.name == "api"], stack.children)
    if stack.server is not None:
        stack.server.stop()
    env_file.unlink(missing_ok=True)
    say("stopped")


def _broker_url(server: EmbeddedServer, with_demo: bool) -> str:
    """The embedded broker's db 0, or :data:`DEMO_DB` for a demo stack: the demo's
    pending retries and dead letters stay there, and a later stack without --demo
    (db 0) never sees them (a later --demo stack picks them up)."""
    return server.url.rsplit("/", 1)[0] + f"/{DEMO_DB}" if with_demo else server.url


def _running_stack(env_file: Path) -> str:
    """The URLs of the stack that holds the state directory, from its stack.env."""
    try:
        values = read_env_file(env_file)
    except OSError:
        return "  (its stack.env is not written yet)"
    keys = ("PIPELINE_BROKER_URL", "PIPELINE_API_URL", "PIPELINE_FLOWER_URL",
            "PIPELINE_EXPORTER_URL")
    return "\n".join(f"  {key.removeprefix('PIPELINE_').lower()}: {redact(values[key])}"
                     for key in keys if key in values)


def _share_metrics_dir(metrics_dir: Path, children: list[Child]) -> None:
    """Workers' pool processes record task metrics into files the exporter reads
    (prometheus-client's multiprocess mode); a previous run's files are removed."""
    metrics_dir.mkdir(exist_ok=True)
    for stale in metrics_dir.glob("*.db"):
        stale.unlink()
    for child in children:
        if child.name == "exporter" or child.name.startswith("worker-"):
            child.extra_env[MULTIPROC_ENV] = str(metrics_dir)


def _services(python: str, env: dict[str, str], endpoints: Endpoints) -> list[Child]:
    """The API, Flower and the exporter, each bound to loopback, with their ports and
    credentials (generated when not configured) recorded in ``env`` and ``endpoints``."""
    base = [python, "-m", "pipeline"]
    return [_api(base, env, endpoints), _flower(base, env, endpoints),
            _exporter(base, endpoints)]


def _api(base: list[str], env: dict[str, str], endpoints: Endpoints) -> Child:
    port = _port(API_PORT)
    if not env.get("PIPELINE_API_TOKEN"):
        env["PIPELINE_API_TOKEN"] = secrets.token_urlsafe(SECRET_BYTES)
        endpoints.generated.append("PIPELINE_API_TOKEN")
    endpoints.values.update(PIPELINE_API_URL=f"http://{LOCAL_HOST}:{port}",
                            PIPELINE_API_PORT=str(port),
                            PIPELINE_API_TOKEN=env["PIPELINE_API_TOKEN"])
    return Child("api", [*base, "serve", "--host", LOCAL_HOST, "--port", str(port)], port=port)


def _flower(base: list[str], env: dict[str, str], endpoints: Endpoints) -> Child:
    port = _port(FLOWER_PORT)
    if not env.get("PIPELINE_FLOWER_BASIC_AUTH"):
        password = secrets.token_urlsafe(SECRET_BYTES)
        env["PIPELINE_FLOWER_BASIC_AUTH"] = f"{FLOWER_USER}:{password}"
        endpoints.generated.append("PIPELINE_FLOWER_BASIC_AUTH")
    endpoints.values.update(PIPELINE_FLOWER_URL=f"http://{LOCAL_HOST}:{port}",
                            PIPELINE_FLOWER_PORT=str(port),
                            PIPELINE_FLOWER_BASIC_AUTH=env["PIPELINE_FLOWER_BASIC_AUTH"])
    return Child("flower", [*base, "flower", "--host", LOCAL_HOST, "--port", str(port)],
                 port=port)


def _exporter(base: list[str], endpoints: Endpoints) -> Child:
    port = _port(EXPORTER_PORT)
    endpoints.values.update(PIPELINE_EXPORTER_URL=f"http://{LOCAL_HOST}:{port}/metrics",
                            PIPELINE_EXPORTER_PORT=str(port))
    return Child("exporter", [*base, "exporter", "--host", LOCAL_HOST, "--port", str(port)],
                 port=port)


def _port(preferred: int) -> int:
    """``preferred`` when nothing listens there on loopback, else a free port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is free
        try:
            s.bind((LOCAL_HOST, preferred))
        except OSError:
            return free_port()
    return preferred


def _wait_listening(services: list[Child], stopping: Callable[[], bool]) -> None:
    """Until every HTTP service accepts connections (or died, or time ran out), so the
    URLs in the banner answer when it appears."""
    deadline = time.monotonic() + HTTP_READY_TIMEOUT_S
    pending = [c for c in services if c.port is not None]
    while pending and time.monotonic() < deadline and not stopping():
        pending = [c for c in pending if c.running() and not _listening(c.port)]
        time.sleep(0.1)


def _listening(port: int | None) -> bool:
    if port is None:
        return True
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((LOCAL_HOST, port)) == 0
