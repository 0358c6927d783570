"""Which broker a ``pipeline`` command talks to when none is configured.

``pipeline up`` writes its broker URL, credentials and URLs to
``<state-dir>/stack.env`` (:mod:`pipeline.endpoints`). A command run where no
broker is configured (no ``PIPELINE_BROKER_URL``, no ``broker_url`` in the config)
would otherwise read the default ``redis://127.0.0.1:6379/0``, a different Redis,
and report an empty pipeline. :func:`adopt_stack` finds the running stack's
``stack.env`` in ``--state-dir`` (default ``.pipeline-state`` in the current
directory) and uses its settings, saying so; a ``stack.env`` whose ``pipeline up``
is gone is ignored.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

__all__ = ["DEFAULT_STATE_DIR", "STACK_ENV", "STACK_PID_KEY", "adopt_stack", "read_env_file"]

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


def adopt_stack(state_dir: Path, broker_configured: bool) -> tuple[Path, dict[str, str]] | None:
    """When no broker is configured, the settings of the live stack that ``state_dir``
    holds, put into ``os.environ`` (what is already set wins); else None."""
    if broker_configured or os.environ.get("PIPELINE_BROKER_URL"):
        return None
    path = state_dir / STACK_ENV
    try:
        values = read_env_file(path)
    except OSError:
        return None
    if not _alive(values.get(STACK_PID_KEY, "")):
        return None  # its `pipeline up` is gone: a stale file names a dead broker
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
