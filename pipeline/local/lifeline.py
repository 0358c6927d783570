"""Children that die with ``pipeline up``, and one ``pipeline up`` per state directory.

:func:`die_with_parent` is a ``preexec_fn``: between fork and exec, the child asks
Linux (``prctl(PR_SET_PDEATHSIG)``) to send it SIGTERM when the process that started
it dies, however it dies (SIGKILL included), so a killed ``pipeline up`` leaves no
broker, API or worker behind holding ports and the broker's data directory. SIGTERM,
not SIGKILL: a worker's warm shutdown stops its own pool processes, and the broker
flushes its append-only file. Elsewhere than Linux it does nothing.

:func:`lock_state_dir` takes an exclusive ``flock`` on ``<state-dir>/up.lock`` for the
life of the process (the kernel drops it when the process dies, whatever kills it),
so a second ``pipeline up`` on the same directory, whose broker would write the same
append-only file, refuses and names the running one.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
from pathlib import Path

__all__ = ["LOCK_FILE", "StateDirBusy", "die_with_parent", "lock_state_dir"]

PR_SET_PDEATHSIG = 1  # prctl option: signal to receive when the parent dies (linux/prctl.h)
LOCK_FILE = "up.lock"  # in the state directory; holds the owner's pid
_starter_pid = os.getpid()  # the process that imported this: the children's parent


class StateDirBusy(Exception):
    """Another live ``pipeline up`` holds the state directory; ``pid`` is its process."""

    def __init__(self, path: Path, pid: str) -> None:
        self.path, self.pid = path, pid
        super().__init__(f"{path} is in use by `pipeline up` (pid {pid or 'unknown'})")


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the parent dies (Linux; else a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != _starter_pid:  # it died before prctl: nobody would signal us
        os._exit(1)


def lock_state_dir(state_dir: Path) -> int:
    """Hold ``state_dir`` for this process (the returned descriptor, never inherited by
    children); raise :class:`StateDirBusy` naming the pid that holds it."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StateDirBusy(state_dir, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
