"""Schemathesis over every route the API serves (webhooks, /metrics and the console's
forms included), as three callers: none, one without the route's scope, one with it.
Zero 5xx for all three; every state-changing route refuses the first two (401/403).

The schema fuzzed is the app's own with every route exposed (the console's pages and
/metrics are hidden from /openapi.json) and the console's forms described, so the
generated cases reach them. What each route needs: :mod:`tests.integration.route_scopes`.
Cases are drawn with schemathesis' hypothesis strategies directly (its pytest
plugin does not support pytest 9 yet).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from pipeline.http.api import create_api
from pipeline.http.console.session import SESSION_COOKIE
from tests.integration.route_scopes import (
    ADMIN,
    ALL_BUT,
    CREDENTIALS,
    ROUTES,
    Need,
    state_changing,
)
from tests.integration.test_api import make_runtime

GITHUB_SECRET = "fuzz-secret-0123456789abcdef"
WEBHOOKS = {"github": {"scheme": "github", "secret_env": "FUZZ_GH_SECRET", "type": "demo.ok"}}
EXAMPLES_PER_ROUTE = 600  # generated requests per public operation, with the right token
EXAMPLES_HIDDEN = 100  # per console page, /metrics and docs page, with the right credential
EXAMPLES_REFUSED = 60  # per operation, without credentials or without the scope
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')
FORM_FIELDS = ("csrf", "token", "step", "tier", "type", "reason", "exception", "handler",
               "fingerprint", "since", "until", "to_tier", "rate")
CONSOLE_FORM = {"requestBody": {"required": True, "content": {
    "application/x-www-form-urlencoded": {"schema": {
        "type": "object", "properties": {f: {"type": "string"} for f in FORM_FIELDS}}}}}}


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    return create_api(make_runtime(redis_url, tmp, webhooks=WEBHOOKS), credentials=CREDENTIALS,
                      environ={"FUZZ_GH_SECRET": GITHUB_SECRET})


@pytest.fixture(scope="module")
def api_schema(api: FastAPI) -> Any:
    for route in api.routes:
        if isinstance(route, APIRoute):
            route.include_in_schema = True  # fuzz what /openapi.json leaves out too
            assert route.methods is not None  # an APIRoute's are set when it is made
            if route.path.startswith("/console") and "POST" in route.methods:
                route.openapi_extra = CONSOLE_FORM
    api.openapi_schema = None
    return schemathesis.openapi.from_asgi("/openapi.json", api)


@pytest.fixture(scope="module")
def sessions(api: FastAPI) -> dict[str, tuple[str, str]]:
    """(cookie, csrf) of a console session per token name: the admin and one without
    ``dlq:write`` (one without ``dlq:read`` cannot log in)."""
    found = {}
    for name, token in [("admin", ADMIN), ("no-write", ALL_BUT["dlq:write"].secret)]:
        with TestClient(api, follow_redirects=False) as c:
            form = c.get("/console/login")
            nonce = CSRF_FIELD.search(form.text)
            assert nonce is not None
            assert c.post("/console/login", data={"token": token,
                                                  "csrf": nonce.group(1)}).status_code == 303
            csrf = CSRF_FIELD.search(c.get("/console").text)
            assert csrf is not None
            found[name] = (c.cookies[SESSION_COOKIE], csrf.group(1))
    return found


def operations(schema: Any) -> list[Any]:
    ops = [result.ok() for result in schema.get_all_operations()]
    served = {(op.method.upper(), op.path) for op in ops}
    assert served == {k for k in ROUTES if k[0] not in ("*", "HEAD") and k[1] != "/openapi.json"}
    return ops


def fuzz(op: Any, examples: int, check: Callable[[Any], None]) -> None:
    @given(case=op.as_strategy())
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        check(case)

    run()


def signed_call(api: FastAPI, case: Any, secret: str) -> int:
    """A generated webhook delivery to ``github``, signed as GitHub signs, with
    ``secret``, over the exact bytes sent (unknown names: the credential-less run)."""
    raw = json.dumps(case.body if case.body is not None else {}).encode()
    mac = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    with TestClient(api) as c:
        return c.post("/webhooks/github", content=raw, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={mac}",
            "X-GitHub-Delivery": hashlib.sha256(raw).hexdigest()}).status_code


def test_generated_requests_with_the_right_credential_never_get_a_5xx(
        api: FastAPI, api_schema: Any, sessions: dict[str, tuple[str, str]]) -> None:
    statuses: Counter[int] = Counter()
    cookie, csrf = sessions["admin"]
    for op in operations(api_schema):
        need = ROUTES[(op.method.upper(), op.path)]

        def check(case: Any, need: Need = need) -> None:
            if need.kind == "signed":
                status = signed_call(api, case, GITHUB_SECRET)
                assert status < 500, (case.path, status)
                statuses[status] += 1
                return
            if need.kind == "session" and isinstance(case.body, dict):
                case.body["csrf"] = csrf
            response = case.call(headers={"Authorization": f"Bearer {ADMIN}"},
                                 cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
            statuses[response.status_code] += 1
            assert response.status_code < 500, (case.path, response.status_code,
                                                response.text[:500])
            if need.kind in ("bearer", "session"):
                assert response.status_code not in (401, 403), (case.path, response.text)

        public = op.path.startswith(("/events", "/dlq", "/webhooks", "/healthz", "/readyz"))
        fuzz(op, EXAMPLES_PER_ROUTE if public else EXAMPLES_HIDDEN, check)
    assert sum(statuses.values()) >= 5000, statuses
    assert statuses[202] + statuses[207] > 0, statuses  # some generated events went through


def refused(need: Need, method: str, status: int) -> bool:
    """Whether ``status`` refuses a caller without the credential ``need`` asks for."""
    if need.kind == "signed":
        return status in (401, 404, 413)  # 404: an unknown name, 413: over the cap
    if need.kind == "session" and not state_changing(method):
        return status == 303  # a page redirects to the login form
    return status in (401, 403)


def test_every_route_that_needs_a_credential_refuses_requests_without_one(
        api_schema: Any) -> None:
    for op in operations(api_schema):
        method, need = op.method.upper(), ROUTES[(op.method.upper(), op.path)]

        def check(case: Any, need: Need = need, method: str = method) -> None:
            response = case.call(allow_redirects=False)
            assert response.status_code < 500, (case.path, response.status_code)
            if need.kind != "open":
                assert refused(need, method, response.status_code), (
                    method, case.path, response.status_code)
            if need.kind in ("bearer", "session") and state_changing(method):
                assert response.status_code == 401, (method, case.path, response.status_code)

        fuzz(op, EXAMPLES_REFUSED, check)


def test_every_route_with_a_scope_refuses_a_caller_without_it(
        api: FastAPI, api_schema: Any, sessions: dict[str, tuple[str, str]]) -> None:
    checked = set()
    cookie, csrf = sessions["no-write"]
    check: Callable[[Any], None]  # one of the branches' checks, each with its own signature
    for op in operations(api_schema):
        method, need = op.method.upper(), ROUTES[(op.method.upper(), op.path)]
        if need.kind == "signed":
            def check(case: Any) -> None:
                status = signed_call(api, case, "another-secret-0123456789abcdef")
                assert status in (401, 413), (case.body, status)
        elif need.kind == "bearer" and need.scope is not None:
            lacking = ALL_BUT[need.scope].secret

            def check(case: Any, lacking: str = lacking) -> None:
                response = case.call(headers={"Authorization": f"Bearer {lacking}"},
                                     allow_redirects=False)
                assert response.status_code == 403, (case.path, response.status_code)
        elif need.kind == "session" and need.scope == "dlq:write":
            def check(case: Any) -> None:
                if isinstance(case.body, dict):
                    case.body["csrf"] = csrf
                response = case.call(cookies={SESSION_COOKIE: cookie}, allow_redirects=False)
                assert response.status_code == 403, (case.path, response.status_code)
        else:
            continue  # open, login, any token; a session without dlq:read cannot exist
        checked.add((method, op.path))
        fuzz(op, EXAMPLES_REFUSED, check)
    assert {k for k, n in ROUTES.items() if state_changing(k[0]) and n.kind != "login"
            and n.scope != "dlq:read"} <= checked
