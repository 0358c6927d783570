"""Fan-out publishes (task events) written without waiting for Redis's reply.

kombu publishes to a fan-out or topic exchange on Redis with ``PUBLISH``, and waits
for its reply: the number of subscribers, which nobody reads. A worker's main
process flushes its task events that way once per turn of its event loop, and
while Redis is busy with the pool's ledger calls each wait held the loop (about a
third of its time on a batched tier): the next job went to an idle child later.
:class:`FanoutWriter` writes the command on a connection of its own and reads the
replies that have arrived before its next write, waiting only when
:data:`FANOUT_DUE_MAX` are outstanding.

What this changes: a connection closed or reset while idle is found before the
next write (a new one takes it); one that fails *after* a write, before Redis read
it, loses that publish without an error, as a ``PUBLISH`` nobody was subscribed to
is lost. An error on the write itself still raises, and kombu's retry (``ensure``)
sends it again on a new connection. Only fan-out publishes go this way; task
messages (``LPUSH``) and acknowledgements keep waiting for their replies.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import redis

__all__ = ["FANOUT_DUE_MAX", "FanoutWriter"]

log = logging.getLogger(__name__)

FANOUT_DUE_MAX = 1000  # replies outstanding before a publish waits for them
_IO_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


class FanoutWriter:
    """``PUBLISH`` commands on one connection of ``client``'s pool, replies read late."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._conn: Any = None
        self._sock: Any = None  # the socket it wrote on: another one means reconnected
        self.due = 0  # replies not read yet

    def publish(self, topics: list[str], payload: str | bytes) -> None:
        """Write ``PUBLISH topic payload`` for each topic; raises when the write fails."""
        try:
            conn = self._ready_connection()
            conn.send_packed_command(
                conn.pack_commands([("PUBLISH", topic, payload) for topic in topics]),
                check_health=False)
        except _IO_ERRORS:
            self._drop(broken=True)
            raise
        self.due += len(topics)

    def _ready_connection(self) -> Any:
        """The connection, the replies that arrived read; a new one if it was closed
        or reset since the last write (found before writing, so nothing is lost)."""
        if self._conn is not None:
            try:
                if self._conn._sock is not self._sock:  # disconnected by its pool
                    raise redis.ConnectionError("fan-out connection closed")
                self._drain(self._conn, wait=self.due >= FANOUT_DUE_MAX)
                if not self.due and self._conn.can_read(timeout=0):  # EOF, or stray bytes
                    raise redis.ConnectionError("fan-out connection closed")
            except _IO_ERRORS as exc:
                log.debug("fan-out connection replaced: %s", exc)
                self._drop(broken=True)
        return self._connection()

    def close(self) -> None:
        """Read what is still due (the server's replies, or its error), then give the
        connection back. Never raises: a channel closes this on its error paths."""
        if self._conn is None:
            return
        try:
            if self._conn._sock is self._sock:
                self._drain(self._conn, wait=True)
        except Exception as exc:  # best effort, as kombu's own close
            log.debug("fan-out replies not read at close: %s", exc)
        with contextlib.suppress(Exception):
            self._drop(broken=True)

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._client.connection_pool.get_connection()
            self._conn.connect()
            self._sock = self._conn._sock
            self.due = 0
        return self._conn

    def _drain(self, conn: Any, *, wait: bool) -> None:
        while self.due and (wait or conn.can_read(timeout=0)):
            try:
                conn.read_response()
            except redis.ResponseError as exc:  # e.g. an ACL refusing the channel
                log.warning("a fan-out publish was refused: %s", str(exc)[:200])
            self.due -= 1

    def _drop(self, *, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken or self.due:
            conn.disconnect()  # replies may still arrive: never hand it on
        self.due = 0
        self._client.connection_pool.release(conn)
