"""Fault injection for integration tests: a TCP proxy that resets connections.

Workers reach the broker through :class:`ResetProxy`; the test process talks to
the broker directly. The proxy can reset every connection now
(:meth:`ResetProxy.reset_all`), at random intervals (:meth:`ResetProxy.chaos`),
or when a client sends bytes containing a marker (:meth:`ResetProxy.drop_on`):
before forwarding them (the command never runs) or after forwarding them and
before relaying the reply (the command ran, its reply is lost). Resets are
``SO_LINGER 0`` closes, i.e. TCP RSTs, as a network blip or a dying middlebox.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

BUFFER_BYTES = 65536  # one read from either side


@dataclass
class _Drop:
    marker: bytes
    times: int
    after_forward: bool


class ResetProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._drops: list[_Drop] = []
        self._muted: set[tuple[socket.socket, socket.socket]] = set()  # replies dropped
        self._closed = threading.Event()
        self.resets = 0  # connections reset so far
        threading.Thread(target=self._accept, daemon=True).start()

    @classmethod
    def before(cls, redis_url: str) -> ResetProxy:
        """A proxy in front of the server of ``redis_url``."""
        return cls(int(redis_url.rsplit(":", 1)[1].split("/", 1)[0]))

    def url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                _rst(client)
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], upstream: bool) -> None:
        src, dst = pair if upstream else (pair[1], pair[0])
        try:
            while True:
                data = src.recv(BUFFER_BYTES)
                if not data or (not upstream and pair in self._muted):
                    break  # a reply to lose: not relayed
                drop = self._take_drop(data) if upstream else None
                if drop is not None and not drop.after_forward:
                    break
                if drop is not None:
                    with self._lock:
                        self._muted.add(pair)
                dst.sendall(data)
                if drop is not None:  # let the command run, then lose its reply
                    time.sleep(0.05)
                    break
        except OSError:
            pass
        self._reset(pair)

    def _take_drop(self, data: bytes) -> _Drop | None:
        with self._lock:
            for drop in self._drops:
                if drop.times > 0 and drop.marker in data:
                    drop.times -= 1
                    return drop
        return None

    def _reset(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            if pair not in self._pairs:
                return
            self._pairs.discard(pair)
            self._muted.discard(pair)
            self.resets += 1
        for sock in pair:
            _rst(sock)

    def reset_all(self) -> int:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._reset(pair)
        return len(pairs)

    def drop_on(self, marker: bytes, *, times: int = 1, after_forward: bool = False) -> None:
        """Reset the connection that next sends ``marker`` (``times`` times)."""
        with self._lock:
            self._drops.append(_Drop(marker, times, after_forward))

    def chaos(self, duration_s: float, *, min_s: float, max_s: float,
              rand: random.Random | None = None) -> threading.Thread:
        """Reset every connection at random intervals for ``duration_s``, in a thread."""
        rng = rand or random.Random()

        def run() -> None:
            deadline = time.monotonic() + duration_s
            while time.monotonic() < deadline and not self._closed.is_set():
                time.sleep(rng.uniform(min_s, max_s))
                self.reset_all()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_all()


def _rst(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
