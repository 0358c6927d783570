"""Redis's protocol for the batch stream: commands packed (:func:`resp`), replies read
straight off a socket (:class:`ReplyReader`).

Packing a command and parsing its reply through redis-py cost a batched event more
CPU than its handler: several method calls and a ``readline`` per line of a reply.
:func:`resp` builds a command as one string, encoded once; :class:`ReplyReader`
takes whatever the socket holds in one ``recv`` and parses every reply in it from
that buffer.

It reads RESP2 and RESP3 (what a Lua script's reply can be: integers, strings,
arrays, null, errors, and the RESP3 doubles, booleans, maps and sets). A push
message (``>``, client tracking) is skipped. An error reply raises
:class:`redis.ResponseError` after the reply is consumed, so the stream stays in
step. The reader owns the socket's incoming bytes: it is only used on a connection
whose redis-py buffer is empty, and a connection it has read from goes back to the
pool only when every reply due was read (:mod:`pipeline.worker.settlestream`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

__all__ = ["ReplyReader", "SocketState", "cork", "evalsha", "registered", "resp", "state_of"]

RECV_BYTES = 65536  # bytes asked of one recv (redis-py's socket_read_size default)
_CRLF = b"\r\n"
_INT, _MAP, _PUSH, _BLOB_ERROR, _VERBATIM = b":%>!="  # reply type bytes, as ints
_AGGREGATES = frozenset(b"*~>%")  # array, set, push, map
_BULKS = frozenset(b"$=!")  # string, verbatim string, blob error


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


def evalsha(sha: str, keys: Sequence[object], args: Sequence[object]) -> bytes:
    """``EVALSHA`` of a loaded script, packed (:func:`resp`)."""
    return resp(["EVALSHA", sha, len(keys), *keys, *args])


def cork(sock: Any, on: bool) -> None:
    """Hold small writes in the kernel until uncorked (Linux; elsewhere, or on a Unix
    socket, nothing: each write leaves at once)."""
    option = getattr(socket, "TCP_CORK", None)
    if option is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, option, int(on))


def registered(client: redis.Redis, source: str) -> Script:
    """``client.register_script(source)``, once per client and source (kept on the
    client, gone with it): a batch uses the same few scripts, and registering hashes
    the source again each time."""
    scripts: dict[str, Script] = client.__dict__.setdefault("_pipeline_scripts", {})
    script = scripts.get(source)
    if script is None:
        script = scripts[source] = client.register_script(source)
    return script


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


class _Incomplete(Exception):
    """The buffer ends inside a reply: read more."""


class ReplyReader:
    """The replies arriving on ``sock``, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def next(self) -> Any:
        """The next reply (waits for it); raises :class:`redis.ResponseError` for an
        error reply and :class:`redis.ConnectionError` when the socket closes."""
        while True:
            try:
                value, self._pos = self._parse(self._pos)
            except _Incomplete:
                self._fill()
                continue
            if isinstance(value, _Push):
                continue
            if isinstance(value, redis.ResponseError):
                raise value
            return value

    def idle(self) -> bool:
        """No byte of a further reply has been read."""
        return self._pos == len(self._buf)

    def _fill(self) -> None:
        data = self._sock.recv(RECV_BYTES)
        if not data:
            raise redis.ConnectionError("the state store closed the connection")
        self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(_CRLF, pos)
        if end < 0:
            raise _Incomplete
        kind = buf[pos]
        if kind == _INT:  # most replies: checked first
            return int(buf[pos + 1:end]), end + 2
        if kind in _AGGREGATES:
            count = int(buf[pos + 1:end]) * (2 if kind == _MAP else 1)
            pos = end + 2
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            if kind == _MAP:
                return dict(zip(items[::2], items[1::2], strict=True)), pos
            return (_Push(items) if kind == _PUSH else items), pos
        if kind in _BULKS:
            size = int(buf[pos + 1:end])
            pos = end + 2
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                raise _Incomplete
            data = buf[pos:pos + size]
            if kind == _BLOB_ERROR:
                return redis.ResponseError(data.decode(errors="replace")), pos + size + 2
            return (data[4:] if kind == _VERBATIM else data), pos + size + 2
        return _simple(kind, buf[pos + 1:end]), end + 2


def _simple(kind: int, line: bytes) -> Any:
    """A one-line reply other than an integer."""
    if kind == ord("+"):
        return line
    if kind == ord("-"):
        return redis.ResponseError(line.decode(errors="replace"))
    if kind == ord("("):
        return int(line)
    if kind == ord("_"):
        return None
    if kind == ord(","):
        return float(line)
    if kind == ord("#"):
        return line == b"t"
    raise redis.ConnectionError(f"unexpected reply type {chr(kind)!r} from the state store")


class _Push(list[Any]):
    """An out-of-band push message: not a reply."""


@dataclass
class SocketState:
    """What is known of one socket: the scripts loaded through it (a new batch loads
    none), and whether its server takes ``CLIENT REPLY`` (None: not asked yet)."""

    sock: Any
    loaded: set[str]
    quiet: bool | None = None


def state_of(conn: Any) -> SocketState:
    """``conn``'s current socket's state. A reconnect starts afresh; a ``SCRIPT FLUSH``
    without one surfaces as ``NOSCRIPT``, handled as any failed call."""
    state = getattr(conn, "_pipeline_state", None)
    if state is None or state.sock is not conn._sock:
        state = SocketState(conn._sock, set())
        conn._pipeline_state = state
    assert isinstance(state, SocketState)
    return state
