"""The batch stream's own reply reader and command packer, against redis-py's."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import redis
from redis.connection import Connection

from pipeline.worker.batchledger import plain_done
from pipeline.worker.ledger import RUNNING_TTL_S
from pipeline.worker.wire import ReplyReader, resp


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


REPLIES = [  # (wire bytes, what the reader returns)
    (b":42\r\n", 42),
    (b":-1\r\n", -1),
    (b"$3\r\nrun\r\n", b"run"),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    (b"$-1\r\n", None),
    (b"_\r\n", None),
    (b"+OK\r\n", b"OK"),
    (b"*2\r\n:1\r\n*1\r\n$3\r\nrun\r\n", [1, [b"run"]]),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"%1\r\n$1\r\nk\r\n:2\r\n", {b"k": 2}),
    (b"~1\r\n:3\r\n", [3]),
    (b",1.5\r\n", 1.5),
    (b"#t\r\n", True),
    (b"(12345678901234567890\r\n", 12345678901234567890),
    (b"=7\r\ntxt:abc\r\n", b"abc"),
]


@pytest.mark.parametrize(("wire", "value"), REPLIES)
def test_each_reply_type_reads_as_redis_py_returns_it_even_one_byte_at_a_time(
    pair: tuple[socket.socket, socket.socket], wire: bytes, value: object,
) -> None:
    ours, theirs = pair
    reader = ReplyReader(ours)
    for i in range(len(wire)):  # every split point: the reader waits for the rest
        theirs.sendall(wire[i:i + 1])
    theirs.sendall(b":7\r\n")
    assert reader.next() == value
    assert reader.next() == 7
    assert reader.idle()


def test_many_replies_in_one_read_come_out_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b"".join(wire for wire, _ in REPLIES))
    reader = ReplyReader(ours)
    assert [reader.next() for _ in REPLIES] == [value for _, value in REPLIES]
    assert reader.idle()


def test_an_error_reply_raises_once_consumed_and_the_next_reply_follows(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b"-NOSCRIPT No matching script\r\n!5\r\nERR x\r\n*2\r\n:1\r\n-ERR in\r\n:9\r\n")
    reader = ReplyReader(ours)
    with pytest.raises(redis.ResponseError, match="NOSCRIPT"):
        reader.next()
    with pytest.raises(redis.ResponseError, match="ERR x"):
        reader.next()
    nested = reader.next()  # an error inside an array is a value, as in redis-py
    assert nested[0] == 1
    assert isinstance(nested[1], redis.ResponseError)
    assert reader.next() == 9


def test_a_push_message_is_skipped(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    theirs.sendall(b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n:5\r\n")
    assert ReplyReader(ours).next() == 5


def test_a_closed_socket_or_an_unknown_type_is_a_connection_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    theirs.sendall(b"?what\r\n")
    with pytest.raises(redis.ConnectionError, match="unexpected reply type"):
        ReplyReader(ours).next()
    theirs.sendall(b":1")
    theirs.close()
    reader = ReplyReader(ours)
    with pytest.raises(redis.ConnectionError, match="closed"):
        reader.next()


@pytest.mark.parametrize("args", [
    ["EVALSHA", "a" * 40, 2, "pipeline:done:t", "pipeline:running:t:1.0", 86400, "tok"],
    ["SET", "clé", "valeur é"],  # not ASCII: characters are not bytes
    ["SET", b"\x00\xff", 1.25, -3, 0],
    ["PING"],
])
def test_commands_are_packed_byte_for_byte_as_redis_py_packs_them(args: list[object]) -> None:
    packed: list[bytes] = Connection().pack_command(*args)  # type: ignore[no-untyped-call]
    assert resp(args) == b"".join(packed)


@pytest.mark.parametrize("start", [None, ("pipeline:running:t2|l/1.0", "tok2 host 12 1.500")])
@pytest.mark.parametrize("prefix", ["pipeline:", "pïpeline:"])  # non-ASCII: its fallback
def test_a_plain_done_settle_is_packed_as_its_three_commands_are_one_by_one(
        start: tuple[str, str] | None, prefix: str) -> None:
    done, running = f"{prefix}done:t1", f"{prefix}running:t1|l/1.0"
    expected = resp(["SET", done, "1", "EX", "86400"]) + resp(["DEL", running])
    if start is not None:
        expected += resp(["SET", *start, "XX", "EX", str(RUNNING_TTL_S)])
    assert plain_done(done, "86400", running, start) == expected
