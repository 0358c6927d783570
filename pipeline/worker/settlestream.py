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
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from pipeline.worker.replyreader import ReplyReader

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
    parts = []
    for arg in args:
        if type(arg) is not str:
            if type(arg) is int:
                arg = str(arg)
            elif type(arg) is float:
                arg = repr(arg)
            else:
                return _resp_bytes(args)
        parts.append(f"${len(arg)}\r\n{arg}\r\n")
    body = "".join(parts)
    if body.isascii():  # a character is a byte, so the lengths hold (most commands)
        return f"*{len(args)}\r\n{body}".encode()
    return _resp_bytes(args)


def _resp_bytes(args: Sequence[object]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
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
    socket lives (a new batch loads none). A reconnect starts afresh; a ``SCRIPT
    FLUSH`` without one surfaces as ``NOSCRIPT``, handled as any failed call
    (:meth:`SettleStream.close` redoes it)."""
    sock = conn._sock
    cached = getattr(conn, "_pipeline_loaded", None)
    if cached is None or cached[0] is not sock:
        cached = (sock, set())
        conn._pipeline_loaded = cached
    loaded: set[str] = cached[1]
    return loaded


@dataclass(frozen=True)
class _Due:
    """A reply due on the stream: ``call``'s (None: a ``SCRIPT LOAD``'s, dropped);
    ``held`` for the caller (a begin's) rather than confirmed at close."""

    call: Call | None
    held: bool = False


class SettleStream:
    """Script calls on one connection, replies read by :meth:`close` (a begin's when
    its caller asks, :meth:`replies`)."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._reader: ReplyReader | None = None
        self._loaded: set[str] = set()
        self._due: deque[_Due] = deque()  # one reply due per entry, in order
        self._read = 0  # replies read so far (an entry's number: replies due before it)
        self._held: dict[int, Any] = {}  # a begin's reply by its entry's number, once read
        self._confirmed: list[tuple[str, object]] = []
        self._broken = False  # a write or read failed: the rest go one by one, synchronously

    def _connection(self) -> tuple[Any, ReplyReader]:
        if self._conn is None or self._reader is None:
            self._conn = self._client.connection_pool.get_connection()
            self._conn.connect()  # no-op when connected: the socket is what _loaded is for
            self._loaded = _loaded_on(self._conn)
            buffered = getattr(getattr(self._conn, "_parser", None), "_buffer", None)
            if buffered is not None and buffered.unread_bytes():  # not ours to read
                self._conn.disconnect()
                self._conn.connect()
            self._reader = ReplyReader(self._conn._sock)
        return self._conn, self._reader

    def _write(self, calls: Sequence[Call], *, held: bool = False) -> list[int]:
        """Write ``calls`` (loading a script the socket has not loaded first); returns
        their entries' numbers."""
        conn, _ = self._connection()
        parts: list[bytes] = []
        due: list[_Due] = []
        loading: set[str] = set()
        for c in calls:
            if c.script.sha not in self._loaded and c.script.sha not in loading:
                parts.append(resp(["SCRIPT", "LOAD", c.script.script]))
                due.append(_Due(None))
                loading.add(c.script.sha)
            parts.append(resp(["EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args]))
            due.append(_Due(c, held))
        conn._sock.sendall(b"".join(parts))
        self._loaded |= loading
        first = self._read + len(self._due)
        self._due.extend(due)
        return [first + i for i, d in enumerate(due) if d.call is not None]

    def _read_one(self) -> None:
        """Read the next reply due; a failed call is written again (synchronously)."""
        assert self._reader is not None
        entry = self._due[0]
        try:
            reply: Any = self._reader.next()
        except redis.ResponseError as exc:  # e.g. NOSCRIPT after a restart
            reply = exc
        self._due.popleft()
        number, self._read = self._read, self._read + 1
        if entry.call is None:
            return
        if entry.held:
            self._held[number] = reply
        elif isinstance(reply, redis.ResponseError):
            if "NOSCRIPT" in str(reply):
                self._loaded.clear()  # flushed: the next batch loads them again
            log.warning("settle stream: %s not applied (%s); writing it again",
                        entry.call.what, str(reply)[:200])
            if entry.call.redo is not None:
                entry.call.redo()
        else:
            self._confirmed.append((entry.call.what, reply))

    def begin_many(self, calls: Sequence[Call]) -> list[Any] | None:
        """The replies of ``calls`` (a batch's begins), written at once; None when the
        connection or a script failed (the caller begins them the usual way)."""
        return self.replies(self.begin_later(calls))

    def begin_later(self, calls: Sequence[Call]) -> list[int] | None:
        """Write ``calls`` (begins); their replies are read when :meth:`replies` asks.
        None when the stream has failed."""
        if self._broken:
            return None
        try:
            return self._write(calls, held=True)
        except (*_IO_ERRORS, redis.ResponseError):
            self._broken = True
            return None

    def replies(self, numbers: list[int] | None) -> list[Any] | None:
        """The replies of the begins written as ``numbers``, waiting for them; None
        when one failed or the stream did (the caller begins them the usual way)."""
        if numbers is None:
            return None
        try:
            while not self._broken and self._due and self._read <= numbers[-1]:
                self._read_one()
        except _IO_ERRORS:
            self._broken = True
        replies = [self._held.pop(n, None) for n in numbers]
        if self._broken or any(r is None or isinstance(r, redis.ResponseError)
                               for r in replies):
            self._broken = True
            return None
        return replies

    def send(self, calls: Sequence[Call]) -> None:
        """Write ``calls`` without waiting for their replies."""
        if not self._broken:
            try:
                self._write(calls)
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
        try:
            try:
                while self._due and not self._broken:
                    self._read_one()
            except _IO_ERRORS:
                self._broken = True
            while self._due:  # written, but whether it ran is unknown: idempotent
                call = self._due.popleft().call
                if call is not None and call.redo is not None:
                    log.warning("settle stream: %s unconfirmed; writing it again", call.what)
                    call.redo()
        finally:
            leftover = self._reader is not None and not self._reader.idle()
            self._release(dirty=self._broken or bool(self._due) or leftover)
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def _release(self, *, dirty: bool) -> None:
        if self._conn is None:
            return
        conn, self._conn, self._reader = self._conn, None, None
        if dirty:
            conn.disconnect()  # replies may still be due: never reuse it
        self._client.connection_pool.release(conn)
