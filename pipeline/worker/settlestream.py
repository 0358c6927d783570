"""A batch's ledger calls, written without waiting for each reply.

One batch message carries many events; waiting for a round trip per event caps a
worker at what one Redis reply takes, whatever the handler costs. A
:class:`SettleStream` owns one connection for the batch: it begins every try in one
write (:meth:`SettleStream.begin_many`: each one to run is claimed *pending*), then
writes each event's *done* settle together with the next event's *start* as soon
as the handler returns, and reads those replies when the batch ends
(:meth:`SettleStream.close`). Commands are packed here (RESP), not by redis-py:
packing, not Redis, was most of a batched event's cost.

Why this keeps the ledger's guarantees: a command is handed to the kernel before
the next handler runs, and Redis runs one connection's commands in order, so what
Redis has seen is always a prefix of what the batch did. A process killed at any
point (SIGKILL, OOM, a hard time limit) leaves the marks a synchronous settle would
have left: its written commands still reach Redis, as a closed socket delivers
what it was sent. What a connection loss or a restarted Redis (scripts flushed)
may have dropped is found when the replies are read: every settle not confirmed is
written again, synchronously and idempotently, before the batch message is
acknowledged; if the state store stays unreachable, that raises and the batch is
redelivered, as any failed settle is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["Call", "SettleStream", "resp"]

log = logging.getLogger(__name__)

_IO_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class Call:
    """One script call: ``redo`` writes it again synchronously when it cannot be
    confirmed (None: a start, which the try's settle supersedes)."""

    script: Script
    keys: list[str]
    args: list[Any]
    what: str
    redo: Callable[[], object] | None = None


def resp(args: Sequence[object]) -> bytes:
    """One command in Redis's protocol (str, bytes, int and float arguments)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is str:  # most arguments: keys, tokens (checked first, exactly)
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(int(arg)).encode()  # type: ignore[call-overload]
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _loaded_on(conn: Any) -> set[str]:
    """The scripts loaded through ``conn``'s current socket: known loaded while that
    socket lives (a new batch skips three ``SCRIPT LOAD`` round trips). A reconnect
    starts afresh; a ``SCRIPT FLUSH`` without one surfaces as ``NOSCRIPT``, handled as
    any failed call (:meth:`SettleStream.close` redoes it)."""
    sock = conn._sock
    cached = getattr(conn, "_pipeline_loaded", None)
    if cached is None or cached[0] is not sock:
        cached = (sock, set())
        conn._pipeline_loaded = cached
    loaded: set[str] = cached[1]
    return loaded


class SettleStream:
    """Script calls on one connection, replies read by :meth:`close`."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._loaded: set[str] = set()
        self._sent: list[Call] = []  # one reply due per call, in order
        self._broken = False  # a write failed: the rest go one by one, synchronously

    def _connection(self, scripts: Sequence[Script]) -> Any:
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
            self._conn.connect()  # no-op when connected: the socket is what _loaded is for
            self._loaded = _loaded_on(self._conn)
        for script in scripts:
            if script.sha not in self._loaded:  # EVALSHA needs it
                self._conn.send_command("SCRIPT", "LOAD", script.script)
                self._conn.read_response()
                self._loaded.add(script.sha)
        return self._conn

    def _write(self, calls: Sequence[Call]) -> Any:
        conn = self._connection(list({c.script.sha: c.script for c in calls}.values()))
        conn.send_packed_command([b"".join(
            resp(["EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args]) for c in calls)],
            check_health=False)
        return conn

    def begin_many(self, calls: Sequence[Call]) -> list[Any] | None:
        """The replies of ``calls`` (a batch's begins), written at once; None when the
        connection or a script failed (the caller begins them the usual way)."""
        if self._broken:
            return None
        try:
            conn = self._write(calls)
            replies = [conn.read_response() for _ in calls]
        except (*_IO_ERRORS, redis.ResponseError):
            self._broken = True
            return None
        return replies

    def send(self, calls: Sequence[Call]) -> None:
        """Write ``calls`` without waiting for their replies."""
        if not self._broken:
            try:
                self._write(calls)
                self._sent.extend(calls)
                return
            except (*_IO_ERRORS, redis.ResponseError):
                log.warning("settle stream lost its connection; settling the rest of the "
                            "batch one by one")
                self._broken = True
        for call in calls:
            if call.redo is not None:
                call.redo()

    def close(self) -> list[tuple[str, object]]:
        """Read every reply; redo what was not confirmed. Returns ``(what, reply)`` for
        each confirmed call. Raises when a redo cannot reach the state store."""
        confirmed: list[tuple[str, object]] = []
        pending, self._sent = self._sent, []
        try:
            while pending and not self._broken:
                call = pending[0]
                try:
                    reply = self._conn.read_response()
                except redis.ResponseError as exc:  # e.g. NOSCRIPT after a restart
                    if "NOSCRIPT" in str(exc):
                        self._loaded.clear()  # flushed: the next batch loads them again
                    log.warning("settle stream: %s not applied (%s); writing it again",
                                call.what, str(exc)[:200])
                    if call.redo is not None:
                        call.redo()
                    pending.pop(0)
                    continue
                except _IO_ERRORS:
                    self._broken = True
                    break
                confirmed.append((call.what, reply))
                pending.pop(0)
            for call in pending:  # written, but whether it ran is unknown: idempotent
                log.warning("settle stream: %s unconfirmed; writing it again", call.what)
                if call.redo is not None:
                    call.redo()
        finally:
            self._release(dirty=self._broken or bool(pending))
        return confirmed

    def _release(self, *, dirty: bool) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if dirty:
            conn.disconnect()  # replies may still be due: never reuse it
        self._client.connection_pool.release(conn)
