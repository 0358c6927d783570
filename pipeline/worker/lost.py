"""An earlier delivery of a try that began and never settled: can it still be running?

A try's running mark names the delivery that began it: ``<token> <host> <pid> <epoch
s>`` (a batch's claim: ``~<token> ...``, pending until it starts). Begin reports a
mark left by another delivery as *lost*; it is a lost attempt only once that delivery
cannot be running any more (:func:`previous_gone`): its process is gone on this host,
its batch in this process has ended, or it is older than a try can run. Until then
the try is rechecked, never run twice.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime

from pipeline.worker.ledger import Begin

__all__ = ["LIVE_CLAIMS", "lost_message", "previous_gone", "process_alive"]

# tokens of the tries this process runs now (a single task's, and every try of a batch
# it has claimed): a delivery of one of them is never judged lost here, however old
LIVE_CLAIMS: set[str] = set()


def previous_gone(begin: Begin, longest_run_s: float) -> bool:
    """Whether the delivery that left ``begin``'s mark can no longer be running:
    its process is gone (this host) or it is older than a try can run
    (``longest_run_s``); never while a thread or greenlet of this process runs it (a
    threads or gevent pool does not stop a synchronous handler at its hard time limit)."""
    host, pid = begin.previous_process
    if host == socket.gethostname() and pid == os.getpid():
        if begin.previous.split()[0].lstrip("~") in LIVE_CLAIMS:
            return False  # still running here: a thread or greenlet past its limit
        if begin.pending:
            return True  # its batch has ended
    gone = host == socket.gethostname() and pid != os.getpid() and not process_alive(pid)
    return gone or begin.age_s >= longest_run_s


def lost_message(previous: str, attempt: int, lost: int) -> str:
    """What the failure of ``attempt``, lost with the delivery that left the running
    mark ``previous``, says (``lost``: tries lost so far, this one included)."""
    parts = previous.split()
    where = (f" on {parts[1]} (pid {parts[2]}) at "
             f"{datetime.fromtimestamp(float(parts[3]), UTC):%H:%M:%S} UTC"
             if len(parts) >= 4 and parts[3].replace(".", "", 1).isdigit() else "")
    return (f"attempt {attempt} began{where} and never finished: its worker "
            f"process was lost (crash, OOM, SIGKILL or a hard time limit); "
            f"{lost} tries lost so far")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
