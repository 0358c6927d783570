"""Supervision of the local stack's child processes: start, restart, stop.

A :class:`Child` is one command run in its own session and process group, its
output appended to ``<log-dir>/<name>.log``. :func:`supervise`, called every
poll, restarts a child that died, with exponential backoff (what it left behind
in its process group is killed first); a child that stayed up long enough starts
its backoff over. :func:`stop_all` stops a first group (the API: no new events),
then the rest, with SIGTERM (Celery's warm shutdown for workers), killing what
outlives the timeout. Nothing here knows what the children are: that is
:mod:`pipeline.local.stack`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from pipeline.local.lifeline import die_with_parent

__all__ = ["Child", "say", "stop_all", "supervise"]

WARM_SHUTDOWN_TIMEOUT_S = 30.0  # how long children get to finish running tasks
RESTART_BACKOFF_MAX_S = 30.0  # longest wait before restarting a crash-looping child
RESTART_RESET_AFTER_S = 60.0  # a child up this long counts as healthy: backoff starts over


@dataclass
class Child:
    """One supervised command: its process, log file and restart bookkeeping."""

    name: str
    argv: list[str]
    port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    log_path: Path | None = None

    def start(self, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"{self.name}.log"
        with self.log_path.open("ab") as handle:
            # Own session and process group: Ctrl-C reaches only `pipeline up`, which
            # stops children in order, and a dead child's leftovers can be killed.
            # die_with_parent: whatever kills `pipeline up`, its children follow.
            self.process = subprocess.Popen(self.argv, env={**env, **self.extra_env},
                                            stdout=handle, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=die_with_parent)
        self.started_at = time.monotonic()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)

    def kill_leftovers(self) -> None:
        """SIGKILL what is left of this child's process group (e.g. the pool children
        of a worker whose main process died). The group id is the child's pid, which
        the kernel does not reuse while the group has members."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)


def supervise(children: list[Child], env: dict[str, str], log_dir: Path) -> None:
    """One round: a dead child is reported and scheduled for a restart with backoff
    (its leftovers killed), and restarted once that time has come."""
    now = time.monotonic()
    for child in children:
        proc = child.process
        if proc is not None and proc.poll() is None:
            if child.restarts and now - child.started_at > RESTART_RESET_AFTER_S:
                child.restarts = 0
            continue
        if proc is not None and child.next_start == 0.0:
            child.kill_leftovers()
            child.restarts += 1
            delay = min(RESTART_BACKOFF_MAX_S, 2.0 ** min(child.restarts, 5))
            child.next_start = now + delay
            say(f"{child.name} exited with {proc.returncode}; restarting in {delay:.0f}s "
                f"(log: {child.log_path})", err=True)
        if now >= child.next_start:
            child.next_start = 0.0
            child.start(env, log_dir)


def stop_all(first: list[Child], children: list[Child]) -> None:
    """SIGTERM ``first`` (the API: no new events) and wait, then everything else; what
    outlives the warm-shutdown timeout is killed with its process group."""
    for group in (first, [c for c in children if c not in first]):
        for child in group:
            child.stop()
        deadline = time.monotonic() + WARM_SHUTDOWN_TIMEOUT_S
        for child in group:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{child.name} did not stop in time; killing it", err=True)
            child.kill_leftovers()
            child.process.wait()


def say(message: str, *, err: bool = False) -> None:
    """Print, never raise: with its output piped (`pipeline up | tee log`), Ctrl-C also
    ends the reader, and a write error must not cut the shutdown short."""
    with contextlib.suppress(OSError):
        click.echo(message, err=err)
