"""Which broker a ``pipeline`` command talks to when none is configured.

``pipeline up`` writes its broker URL, credentials and URLs to
``<state-dir>/stack.env`` (:mod:`pipeline.local.banner`). A command run where no
broker is configured (no ``PIPELINE_BROKER_URL``, no ``broker_url`` in the config)
would otherwise read the default ``redis://127.0.0.1:6379/0``, a different Redis,
and report an empty pipeline. :func:`adopt_stack` finds the running stack's
``stack.env`` in ``--state-dir`` (default ``.pipeline-state`` in the current
directory) and uses its settings, saying so. A ``stack.env`` whose ``pipeline up``
is gone (killed with SIGKILL, the machine rebooted) raises :class:`StaleStack`:
reading the default Redis instead would report another broker's state.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from pipeline.errors import NO_VALUE, ConfigError, FieldProblem

__all__ = ["DEFAULT_STATE_DIR", "STACK_ENV", "STACK_PID_KEY", "StaleStack", "adopt_stack",
           "read_env_file"]

DEFAULT_STATE_DIR = Path(".pipeline-state")  # where `pipeline up` keeps its state
STACK_ENV = "stack.env"  # the file `pipeline up` writes in its state directory
STACK_PID_KEY = "PIPELINE_UP_PID"  # the pid of the `pipeline up` that wrote stack.env


def read_env_file(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines of a stack.env (values shell-quoted)."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = " ".join(shlex.split(value))
    return values


class StaleStack(ConfigError):
    """No broker is configured and the ``pipeline up`` that wrote the state
    directory's ``stack.env`` is gone."""

    def __init__(self, path: Path, pid: str) -> None:
        super().__init__([FieldProblem(
            "broker_url", NO_VALUE,
            f"not set, and the `pipeline up` (pid {pid or '?'}) that wrote {path} is gone: "
            f"start it again (`pipeline up`), or set PIPELINE_BROKER_URL to the broker to "
            f"use (remove {path} to fall back to redis://127.0.0.1:6379/0)")])


def adopt_stack(state_dir: Path, broker_configured: bool) -> tuple[Path, dict[str, str]] | None:
    """When no broker is configured, the settings of the live stack that ``state_dir``
    holds, put into ``os.environ`` (what is already set wins); else None. Raises
    :class:`StaleStack` when that stack is gone."""
    if broker_configured or os.environ.get("PIPELINE_BROKER_URL"):
        return None
    path = state_dir / STACK_ENV
    try:
        values = read_env_file(path)
    except OSError:
        return None
    if not _alive(values.get(STACK_PID_KEY, "")):  # a stale file names a dead broker
        raise StaleStack(path, values.get(STACK_PID_KEY, ""))
    for key, value in values.items():
        os.environ.setdefault(key, value)
    return path, values


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
