"""A batch's ledger calls, written without waiting for each reply.

Waiting for a round trip per event caps a worker at what one Redis reply takes. A
:class:`SettleStream` owns one connection for a batch: it begins every try in one
round trip (:meth:`~SettleStream.begin_many`: those to run are claimed *pending*),
writes each event's *done* settle and the next one's *start* as soon as the
handler returns, and confirms them at the end (:meth:`~SettleStream.close`).

Why this keeps the ledger's guarantees: a command is handed to the kernel before
the next handler runs, and Redis runs one connection's commands in order, so what
Redis has seen is always a prefix of what the batch did. A process killed at any
point (SIGKILL, OOM, a hard time limit) leaves the marks a synchronous settle would
have left: the kernel still delivers what it was handed, then closes the connection.
That holds only while nothing the server sent is unread: a socket closed with unread
bytes is *reset*, which discards what the server had not read yet. So once the
begin's reply is read the stream turns replies off (``CLIENT REPLY OFF``) and corks
the socket (``TCP_CORK``: settles leave in full segments, within 200 ms, at the
close, or when the process dies). At the close it turns replies on again and one
script call says which settles took effect. What a connection loss or a restarted
Redis (scripts flushed) dropped is written again, synchronously and idempotently,
before the batch message is acknowledged; if the state store stays unreachable, that
raises and the batch is redelivered, as any failed settle is. A server that refuses
``CLIENT REPLY`` gets replies read at the close, as before.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from pipeline.worker.wire import ReplyReader, SocketState, cork, evalsha, registered, resp, state_of

__all__ = ["Call", "SettleStream"]

log = logging.getLogger(__name__)

_IO_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class Call:
    """One script call: ``redo`` writes it again synchronously when it cannot be
    confirmed (None: a start, which the try's settle supersedes); ``applied_if``: two
    keys either of which shows it ran. (A plain class: one is made per event.)"""

    __slots__ = ("applied_if", "args", "keys", "redo", "script", "what")

    def __init__(self, script: Script, keys: list[str], args: list[Any], what: str,
                 redo: Callable[[], object] | None = None,
                 applied_if: tuple[str, str] | None = None) -> None:
        self.script, self.keys, self.args, self.what = script, keys, args, what
        self.redo, self.applied_if = redo, applied_if


REPLY_OFF, REPLY_ON = resp(["CLIENT", "REPLY", "OFF"]), resp(["CLIENT", "REPLY", "ON"])
# KEYS: two per call, either of which existing shows it took effect. Returns 1/0 each,
# or (every one took effect: the usual case) their count, one integer to read.
_APPLIED_LUA = """
local out, every = {}, true
for i = 1, #KEYS / 2 do
  if redis.call('EXISTS', KEYS[2 * i - 1], KEYS[2 * i]) > 0 then out[i] = 1
  else out[i] = 0; every = false end
end
if every then return #out end
return out
"""


@dataclass(frozen=True)
class _Due:
    """A reply due on the stream: ``call``'s (None: a ``SCRIPT LOAD``'s, dropped);
    ``held`` for the caller (a begin's) rather than confirmed at close."""

    call: Call | None
    held: bool = False


class SettleStream:
    """Script calls on one connection: a begin's reply read when its caller asks, the
    rest confirmed by :meth:`close`."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._reader: ReplyReader | None = None
        self._state = SocketState(None, set())
        self._applied = registered(client, _APPLIED_LUA)
        self._due: deque[_Due] = deque()  # one reply due per entry, in order
        self._read = 0  # replies read so far (an entry's number: replies due before it)
        self._held: dict[int, Any] = {}  # a begin's reply by its entry's number, once read
        self._confirmed: list[tuple[str, object]] = []
        self._unheard: list[Call] = []  # written with replies off: confirmed at close
        self._quiet = False  # replies are off (and the socket corked)
        self._broken = False  # a write or read failed: the rest go one by one, synchronously

    def _connection(self) -> tuple[Any, ReplyReader]:
        if self._conn is None or self._reader is None:
            self._conn = self._client.connection_pool.get_connection()
            self._conn.connect()  # no-op when connected: the socket is what _state is for
            buffered = getattr(getattr(self._conn, "_parser", None), "_buffer", None)
            if buffered is not None and buffered.unread_bytes():  # not ours to read
                self._conn.disconnect()
                self._conn.connect()
            self._state = state_of(self._conn)
            self._reader = ReplyReader(self._conn._sock)
            if self._state.quiet is None:  # once per socket: does it take CLIENT REPLY?
                self._conn._sock.sendall(REPLY_ON)
                try:
                    self._state.quiet = self._reader.next() == b"OK"
                except redis.ResponseError:
                    self._state.quiet = False
        return self._conn, self._reader

    def _write(self, calls: Sequence[Call], *, held: bool = False) -> list[int]:
        """Write ``calls`` (scripts loaded first); their entries' numbers (none if quiet)."""
        conn, _ = self._connection()
        quiet = not held and (self._quiet or (self._state.quiet is True and not self._due))
        parts: list[bytes] = [REPLY_OFF] if quiet and not self._quiet else []
        due: list[_Due] = []
        loading: set[str] = set()
        for c in calls:
            if c.script.sha not in self._state.loaded and c.script.sha not in loading:
                parts.append(resp(["SCRIPT", "LOAD", c.script.script]))
                due.append(_Due(None))
                loading.add(c.script.sha)
            parts.append(evalsha(c.script.sha, c.keys, c.args))
            due.append(_Due(c, held))
        if quiet and not self._quiet:
            cork(conn._sock, True)
            self._quiet = True
        conn._sock.sendall(b"".join(parts))
        self._state.loaded |= loading
        if quiet:
            self._unheard.extend(calls)
            return []
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
                self._state.loaded.clear()  # flushed: the next batch loads them again
            self._redo(entry.call, f"not applied ({str(reply)[:200]})")
        else:
            self._confirmed.append((entry.call.what, reply))

    def _redo(self, call: Call, why: str) -> None:
        if call.redo is not None:
            log.warning("settle stream: %s %s; writing it again", call.what, why)
            call.redo()

    def begin_many(self, calls: Sequence[Call],
                   meanwhile: Callable[[], object] | None = None) -> list[Any] | None:
        """The replies of ``calls`` (a batch's begins), written at once, ``meanwhile``
        run while Redis works; None when the connection or a script failed (the caller
        begins them the usual way)."""
        if self._broken or self._quiet:
            return None
        try:
            numbers = self._write(calls, held=True)
            if meanwhile is not None:
                meanwhile()
            while self._due and self._read <= numbers[-1]:
                self._read_one()
        except (*_IO_ERRORS, redis.ResponseError):
            self._broken = True
            return None
        replies = [self._held.pop(n, None) for n in numbers]
        if any(r is None or isinstance(r, redis.ResponseError) for r in replies):
            self._broken = True
            return None
        return replies

    @property
    def quiet(self) -> bool:
        """Replies are off: what is written now is confirmed at the close."""
        return self._quiet and self._conn is not None and not self._broken

    def send(self, calls: Sequence[Call]) -> None:
        """Write ``calls`` without waiting for their replies."""
        if len(calls) == 1 and self.quiet and calls[0].script.sha in self._state.loaded:
            call = calls[0]  # a batch's settle
            self.send_plain(call, evalsha(call.script.sha, call.keys, call.args))
            return
        if not self._broken:
            try:
                self._write(calls)
                return
            except (*_IO_ERRORS, redis.ResponseError):
                self._lost()
        for call in calls:
            self._redo(call, "not written")

    def send_plain(self, call: Call, data: bytes) -> None:
        """``call`` written as ``data`` while :attr:`quiet`: its script call, or plain
        commands of the same effect (their replies are never read)."""
        if self.quiet:
            try:
                self._conn._sock.sendall(data)
                self._unheard.append(call)
                return
            except _IO_ERRORS:
                self._lost()
        self._redo(call, "not written")

    def _lost(self) -> None:
        log.warning("settle stream lost its connection; settling the rest of the batch "
                    "one by one")
        self._broken = True

    def close(self, extra: Sequence[Call] = ()) -> list[tuple[str, object]]:
        """Confirm what was written, redo what was not applied, write ``extra`` and read
        its replies: ``(what, reply)`` for each call confirmed (``None``: by its
        effect). Raises when a redo cannot reach the state store."""
        try:
            try:
                self._hear(extra)
                while self._due and not self._broken:
                    self._read_one()
            except _IO_ERRORS:
                self._broken = True
            unheard, self._unheard = self._unheard, []
            for call in unheard:  # written, but whether it ran is unknown: idempotent
                self._redo(call, "unconfirmed")
            while self._due:
                entry = self._due.popleft()
                if entry.call is not None:
                    self._redo(entry.call, "unconfirmed")
        finally:
            leftover = self._reader is not None and not self._reader.idle()
            self._release(dirty=self._broken or self._quiet or bool(self._due) or leftover)
        confirmed, self._confirmed = self._confirmed, []
        return confirmed

    def _hear(self, extra: Sequence[Call]) -> None:
        """Replies on again, and which of the calls written without them took effect
        (those confirmed leave :attr:`_unheard`); then ``extra``."""
        if self._broken:
            return
        if not self._quiet:
            if extra:
                self._write(extra)
            return
        checked: list[Call] = []  # confirmed by their effect
        unchecked: list[Call] = []  # the rest (starts: their try's settle supersedes them)
        for c in self._unheard:
            (checked if c.redo is not None and c.applied_if else unchecked).append(c)
        check = Call(self._applied, [k for c in checked for k in c.applied_if or ()], [],
                     what="applied")
        conn, _ = self._connection()
        conn._sock.sendall(REPLY_ON)
        self._quiet = False
        self._due.append(_Due(None))
        numbers = self._write([check], held=True)
        self._write(extra)
        cork(conn._sock, False)  # what is corked leaves now
        while self._due and self._read <= numbers[-1]:
            self._read_one()
        flags = self._held.pop(numbers[-1], None)
        if flags == len(checked):  # every one took effect (the usual case)
            self._confirmed += [(c.what, None) for c in checked]
            self._unheard = unchecked
            return
        if not isinstance(flags, list):
            self._broken = True
            return
        ran = {id(c) for c, flag in zip(checked, flags, strict=True) if flag}
        if len(ran) < len(checked):  # e.g. NOSCRIPT, unheard: the next batch loads them
            self._state.loaded.clear()
        self._confirmed += [(c.what, None) for c in checked if id(c) in ran]
        self._unheard = [c for c in self._unheard if id(c) not in ran]

    def _release(self, *, dirty: bool) -> None:
        conn, self._conn, self._reader = self._conn, None, None
        if conn is not None:
            if dirty:
                conn.disconnect()  # replies may still be due, or be off: never reuse it
            self._client.connection_pool.release(conn)
