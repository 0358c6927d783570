"""Console sessions: a signed cookie that carries a token's name and scopes, and CSRF.

A session is ``base64url(json) "." base64url(HMAC-SHA256)`` under a key of the API
process (:func:`new_key`): nothing is stored server-side, a cookie changed by one
bit is refused, and a restart of the API logs every browser out. The JSON holds the
token's name and scopes, when it expires and a per-session CSRF token that every
state-changing form echoes in a hidden field (:func:`csrf_ok`). The token itself is
never in the cookie.

Before a session exists, the login form is protected by a double-submit cookie: the
login page sets :data:`LOGIN_COOKIE` to a random value that the form echoes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

__all__ = ["LOGIN_COOKIE", "SESSION_COOKIE", "SESSION_MAX_AGE_S", "Session", "csrf_ok",
           "new_key", "new_session", "read_session", "sign_session"]

SESSION_COOKIE = "pipeline_console"  # the signed session cookie's name
LOGIN_COOKIE = "pipeline_console_login"  # the login form's double-submit CSRF cookie
SESSION_MAX_AGE_S = 8 * 3600  # a session lasts one working shift, then log in again
KEY_BYTES = 32  # HMAC key size of a process's session key
CSRF_BYTES = 24  # random bytes of a CSRF token


@dataclass(frozen=True)
class Session:
    """Who is logged in: the token's name (audit entries name it) and its scopes."""

    name: str
    scopes: frozenset[str]
    csrf: str
    expires_at: float  # unix seconds

    @property
    def caller(self) -> str:
        """How audit entries name this session's token, as for a bearer token."""
        return f"token:{self.name}"


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def new_session(name: str, scopes: frozenset[str], now: float | None = None) -> Session:
    at = time.time() if now is None else now
    return Session(name, scopes, secrets.token_urlsafe(CSRF_BYTES), at + SESSION_MAX_AGE_S)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, body: str) -> str:
    return _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())


def sign_session(key: bytes, session: Session) -> str:
    body = _b64(orjson.dumps({"n": session.name, "s": sorted(session.scopes),
                              "c": session.csrf, "e": session.expires_at}))
    return f"{body}.{_mac(key, body)}"


def read_session(key: bytes, cookie: str | None, now: float | None = None) -> Session | None:
    """The session ``cookie`` carries, or None: absent, malformed, tampered or expired."""
    if not cookie or cookie.count(".") != 1:
        return None
    body, mac = cookie.split(".")
    if not hmac.compare_digest(mac, _mac(key, body)):
        return None
    try:
        data = orjson.loads(_unb64(body))
        session = Session(str(data["n"]), frozenset(map(str, data["s"])), str(data["c"]),
                          float(data["e"]))
    except (ValueError, KeyError, TypeError):
        return None
    return session if session.expires_at > (time.time() if now is None else now) else None


def csrf_ok(expected: str | None, offered: str | None) -> bool:
    """Whether a form's CSRF field matches; a missing value on either side never does."""
    return bool(expected) and bool(offered) and hmac.compare_digest(
        str(expected).encode(), str(offered).encode())
