"""Broker URLs compared and shown: does ``state_url`` name the broker's own Redis,
does the pipeline's ``broker_url`` name an attached app's broker (:func:`same_broker`),
and a URL as it may be printed (never with its password): :func:`redact` for one
URL (any scheme), :func:`mask_urls` for every URL inside a text (log lines).

Two ``redis://``/``rediss://`` URLs name the same Redis when host (any case), port
(default 6379) and database (default 0; the path, or a ``db`` query parameter, which
redis-py obeys over the path) are equal. Scheme (TLS or not), credentials, a trailing
slash and the rest of the query do not matter. Anything else (``sentinel://``, a
unix socket, a database that is not a number) is the same only when the URLs are
identical: which server a Sentinel names is known only by asking it. Two AMQP URLs
name the same broker when host, port (default 5672, 5671 for ``amqps``), virtual
host and user are equal (``amqp``, ``pyamqp`` and ``librabbitmq`` are one scheme).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

__all__ = ["mask_urls", "redact", "same_broker", "same_redis"]

DEFAULT_REDIS_PORT = 6379  # port kombu and redis-py connect to when a URL names none
DEFAULT_REDIS_DB = 0  # database kombu and redis-py select when a URL names none
MASK = "***"  # stands in for a password in anything printed
DEFAULT_AMQP_PORTS = {"amqp": 5672, "amqps": 5671}  # RabbitMQ's ports when a URL names none
_AMQP_SCHEMES = {"amqp": "amqp", "pyamqp": "amqp", "librabbitmq": "amqp", "amqps": "amqps"}
_COMPARABLE_SCHEMES = ("redis", "rediss")  # URLs whose host, port and db say it all
_SECRET_QUERY_KEYS = ("password", "sentinel_password")  # query parameters masked too
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")  # a URL inside a text
_USERINFO = re.compile(r"(://[^\s:/@]*):[^\s@/]*@")  # fallback for what urlsplit refuses


def same_redis(a: str, b: str) -> bool:
    """Whether URLs ``a`` and ``b`` name the same Redis server and database."""
    ia, ib = _identity(a), _identity(b)
    if ia is None or ib is None:
        return a.strip() == b.strip()
    return ia == ib


def same_broker(a: str, b: str) -> bool:
    """Whether broker URLs ``a`` and ``b`` name the same broker (Redis: the same
    server and database; AMQP: the same server, virtual host and user)."""
    ia, ib = _amqp_identity(a), _amqp_identity(b)
    if ia is not None or ib is not None:
        return ia == ib
    return same_redis(a, b)


def _amqp_identity(url: str) -> tuple[str, str, int, str, str] | None:
    """(scheme, host, port, virtual host, user) of an AMQP URL; ``None`` for others."""
    parts = urlsplit(url.strip())
    scheme = _AMQP_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        return None
    try:
        port = parts.port or DEFAULT_AMQP_PORTS[scheme]
    except ValueError:
        return None
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    vhost = unquote(path) or "/"
    return scheme, (parts.hostname or "localhost").lower(), port, vhost, parts.username or ""


def _identity(url: str) -> tuple[str, int, int] | None:
    """(host, port, db) of a plain TCP Redis URL; ``None`` when the URL says less."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in _COMPARABLE_SCHEMES or not parts.hostname:
        return None
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:  # a port that is not a number
        return None
    query_db = dict(parse_qsl(parts.query)).get("db")
    db = (query_db or parts.path.strip("/") or str(DEFAULT_REDIS_DB)).strip()
    if not db.isdigit():
        return None
    return parts.hostname.lower(), port, int(db)


def redact(url: str) -> str:
    """``url`` with every password (each ``;``-joined Sentinel URL's, and any in the
    query) replaced by ``***``."""
    return ";".join(_redact_one(part) for part in url.split(";"))


def mask_urls(text: str) -> str:
    """``text`` with the password of every URL in it masked (a log line, an error)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _safe_redact(m.group(0)), text)


def _safe_redact(url: str) -> str:
    try:
        return redact(url)
    except ValueError:  # not a URL urlsplit can read (a bad IPv6 host, a bad port)
        return _USERINFO.sub(rf"\1:{MASK}@", url)


def _redact_one(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        masked = [(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs]
        query = urlencode(masked, safe="*") if masked != pairs else query
    return urlunsplit(parts._replace(netloc=netloc, query=query))
