"""Console sessions (signed cookies, CSRF) and the sparkline: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.http.console.render import SPARK_HOURS, sparkline
from pipeline.http.console.session import (
    SESSION_MAX_AGE_S,
    csrf_ok,
    new_key,
    new_session,
    read_session,
    sign_session,
)

SCOPES = frozenset({"dlq:read", "dlq:write"})


def test_a_signed_session_reads_back_with_name_scopes_and_csrf() -> None:
    key = new_key()
    session = new_session("ops", SCOPES)
    read = read_session(key, sign_session(key, session))
    assert read == session
    assert read is not None
    assert read.caller == "token:ops"


def test_a_tampered_or_foreign_cookie_is_no_session() -> None:
    key = new_key()
    signed = sign_session(key, new_session("reader", frozenset({"dlq:read"})))
    body, mac = signed.split(".")
    forged = sign_session(new_key(), new_session("reader", SCOPES))
    assert read_session(key, forged) is None  # another process's key
    assert read_session(key, body[:-2] + "AA." + mac) is None
    assert read_session(key, forged.split(".")[0] + "." + mac) is None
    for junk in (None, "", "x", "a.b.c", ".", "%%%.%%%"):
        assert read_session(key, junk) is None


def test_a_session_expires() -> None:
    key = new_key()
    signed = sign_session(key, new_session("ops", SCOPES, now=1000.0))
    assert read_session(key, signed, now=1000.0 + SESSION_MAX_AGE_S - 1) is not None
    assert read_session(key, signed, now=1000.0 + SESSION_MAX_AGE_S) is None


def test_csrf_needs_both_values_equal() -> None:
    assert csrf_ok("abc", "abc")
    assert not csrf_ok("abc", "abd")
    assert not csrf_ok("abc", None)
    assert not csrf_ok(None, "abc")
    assert not csrf_ok("", "")


def test_sparkline_draws_one_bar_per_hour_with_failures() -> None:
    now = datetime(2026, 11, 30, 12, 30, tzinfo=UTC)
    hour = now.replace(minute=0)
    svg = sparkline({hour: 4, hour - timedelta(hours=3): 2,
                     hour - timedelta(hours=SPARK_HOURS): 99}, now=now)  # outside the window
    assert svg.count("<rect") == 2
    assert "6 in the last 24 h, at most 4 an hour" in svg
    assert "<script" not in svg
