"""Shared by the scenarios: an own broker, medians, and writing results."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.local.embedded import EmbeddedServer, start_server

RESULTS_DIR = Path(__file__).parent / "results"
QUICK_DIR = RESULTS_DIR / "quick"  # --quick runs write here (gitignored), never over full runs
READY_TIMEOUT_S = 60.0  # a worker that is not ready by then fails the run
STOP_TIMEOUT_S = 60.0  # warm shutdown may take this long before the worker is SIGKILLed


@contextmanager
def own_broker() -> Iterator[EmbeddedServer]:
    """A Redis-protocol server of the benchmark's own, on a free port."""
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        server = start_server(Path(tmp), persist=False)
        try:
            yield server
        finally:
            server.stop()


@contextmanager
def logs_kept_on_failure(tmp: Path) -> Iterator[None]:
    """Remove a scenario's worker-log directory ``tmp`` after a run; keep it, and say
    where it is, when the run fails."""
    try:
        yield
    except BaseException:
        print(f"worker logs kept in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def clean_env() -> dict[str, str]:
    """This process's environment without pipeline settings or a metrics directory,
    so each side of a scenario starts from the same, explicit configuration."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PIPELINE_", "PROMETHEUS_MULTIPROC_DIR"))}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def results_dir(quick: bool = False) -> Path:
    where = QUICK_DIR if quick else RESULTS_DIR
    where.mkdir(parents=True, exist_ok=True)
    return where


def write_results(scenario: str, data: dict[str, Any], *, quick: bool = False,
                  machine: dict[str, Any] | None = None) -> Path:
    data = {"scenario": scenario, "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "machine": {"python": platform.python_version(), "cpus": _cpus(),
                        **(machine or {})}, **data}
    path = results_dir(quick) / f"{scenario}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def commit() -> str:
    """``git rev-parse --short HEAD``, marked when the tree has uncommitted changes."""
    here = Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=here).stdout.strip()
        # results written by earlier scenarios of the same session do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!results"],
                               capture_output=True, text=True, check=True, cwd=here
                               ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def versions(url: str | None = None) -> dict[str, str]:
    """Celery, kombu and redis-py versions, and the broker server's when ``url`` is given."""
    import celery
    import kombu
    import redis

    found = {"celery": celery.__version__, "kombu": kombu.__version__,  # type: ignore[attr-defined]
             "redis_py": redis.__version__}
    if url:
        client = redis.Redis.from_url(url)
        try:
            info: dict[str, Any] = client.info("server")
        finally:
            client.close()
        if "valkey_version" in info:
            found["broker"] = f"valkey {info['valkey_version']}"
        else:
            found["broker"] = f"redis {info.get('redis_version', '?')}"
    return found


def start_worker(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a worker subprocess and return once its log says it is ready."""
    return start_workers([(argv, env, log)])[0]


def start_workers(specs: list[tuple[list[str], dict[str, str], Path]]
                  ) -> list[subprocess.Popen[bytes]]:
    """Start every ``(argv, env, log)`` worker at once; return when all logs say ready
    (on failure, stop the ones started and raise with the failing worker's log)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for argv, env, log in specs:
            with log.open("wb") as out:
                procs.append(subprocess.Popen(argv, env=env, stdout=out,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for proc, (_, _, log) in zip(procs, specs, strict=True):
            while " ready." not in log.read_text(errors="replace"):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
                time.sleep(0.02)
    except BaseException:
        for proc in procs:
            stop_worker(proc)
        raise
    return procs


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def stop_worker(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Warm shutdown (SIGTERM: running tasks finish, prefetched ones go back to the
    queue); SIGKILL it and its pool children, by pid, if it takes too long."""
    if proc.poll() is not None:
        return
    children = child_pids(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


def rss_kb(pid: int) -> dict[str, int]:
    """Resident set size (kB) of ``pid`` and of each of its children, from /proc."""
    sizes = {}
    for p in [pid, *child_pids(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes[str(p)] = int(line.split()[1])
        except OSError:
            continue
    return sizes


def cpu_s(pid: int, *, with_children: bool = True) -> float:
    """CPU seconds (user + system) of ``pid`` from /proc, with its reaped children's and,
    when ``with_children``, its live children's (a worker's pool processes)."""
    tick_hz = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for i, p in enumerate([pid, *(child_pids(pid) if with_children else [])]):
        try:
            # fields after the parenthesised command: utime stime cutime cstime at 11..14
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if i == 0:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / tick_hz
    return total


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
