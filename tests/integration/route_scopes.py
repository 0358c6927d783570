"""What each route of the API asks of its caller: one table for the security tests.

A route the app serves that is missing here fails
``test_every_route_of_the_app_is_in_the_scope_table``, so a new route cannot ship
without someone saying which credential it checks (and the tests then checking it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from fastapi import FastAPI
from starlette.routing import Mount, Route

from pipeline.core.tokens import ALL_SCOPES, Credential, Scope

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # every other method changes state


@dataclass(frozen=True)
class Need:
    """``kind``: open | signed (a webhook's signature) | login (the console's login
    form: the token is the credential) | bearer | session (the console's cookie);
    ``scope``: what a bearer token or session must hold (None: any valid token)."""

    kind: str
    scope: Scope | None = None


OPEN, SIGNED, LOGIN = Need("open"), Need("signed"), Need("login")

ROUTES: dict[tuple[str, str], Need] = {
    ("GET", "/openapi.json"): OPEN,
    ("HEAD", "/openapi.json"): OPEN,
    ("*", "/static-offline-docs"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/oauth2-redirect"): OPEN,
    ("GET", "/redoc"): OPEN,
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("POST", "/events"): Need("bearer", "ingest"),
    ("POST", "/events/batch"): Need("bearer", "ingest"),
    ("POST", "/webhooks/{name}"): SIGNED,
    ("GET", "/metrics"): Need("bearer"),
    ("GET", "/dlq"): Need("bearer", "dlq:read"),
    ("GET", "/dlq/stats"): Need("bearer", "dlq:read"),
    ("GET", "/dlq/audit"): Need("bearer", "dlq:read"),
    ("GET", "/dlq/{record_id}"): Need("bearer", "dlq:read"),
    ("POST", "/dlq/replay"): Need("bearer", "dlq:write"),
    ("POST", "/dlq/purge"): Need("bearer", "dlq:write"),
    ("GET", "/console/login"): OPEN,
    ("POST", "/console/login"): LOGIN,
    ("POST", "/console/logout"): Need("session", "dlq:read"),
    ("GET", "/console"): Need("session", "dlq:read"),
    ("GET", "/console/records"): Need("session", "dlq:read"),
    ("GET", "/console/records/{record_id}"): Need("session", "dlq:read"),
    ("POST", "/console/replay"): Need("session", "dlq:write"),
    ("POST", "/console/purge"): Need("session", "dlq:write"),
}

ADMIN = "admin-token-0123456789abcdef"
# a token holding every scope but one, per scope: the caller that must get 403
ALL_BUT = {scope: Credential(f"no-{scope.replace(':', '-')}", f"all-but-{scope}-0123456789",
                             frozenset(ALL_SCOPES) - {scope}) for scope in ALL_SCOPES}
CREDENTIALS = [Credential("default", ADMIN), *ALL_BUT.values()]


def app_routes(api: FastAPI | Any) -> set[tuple[str, str]]:
    """(method, path) of everything ``api`` serves; ``*`` for a mounted app."""
    found = set()
    for route in api.routes:
        if isinstance(route, Mount):
            found.add(("*", route.path))
        elif isinstance(route, Route) or hasattr(route, "methods"):
            found |= {(method, cast(Route, route).path) for method in route.methods or ()}
    return found


def state_changing(method: str) -> bool:
    """``*`` (a mount) is the docs' static files: 405 to anything but GET and HEAD,
    which ``test_no_state_changing_route_is_open`` checks."""
    return method not in READ_METHODS and method != "*"
