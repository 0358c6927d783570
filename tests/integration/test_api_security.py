"""Who gets in: no credentials is 401 on every route that reads or writes, scopes are 403."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from pipeline.core.tokens import Credential
from pipeline.errors import ConfigError
from pipeline.http.api import create_api
from pipeline.worker.runtime import Runtime
from tests.integration.route_scopes import ROUTES, app_routes, state_changing
from tests.integration.test_api import make_runtime

OPEN_ROUTES = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect",
               "/redoc"}  # reveal nothing and change nothing
SIGNED_ROUTES = {"/webhooks/{name}"}  # signature-checked: tests/integration/test_webhooks.py
ADMIN = "admin-token-0123456789abcdef"
INGEST = "ingest-token-0123456789abcdef"
GAME = "game-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
WRITER = "writer-token-0123456789abcdef"
CREDENTIALS = [
    Credential("default", ADMIN),
    Credential("ingest", INGEST, frozenset({"ingest"})),
    Credential("game", GAME, frozenset({"ingest"}), ("game-*",)),
    Credential("reader", READER, frozenset({"dlq:read"})),
    Credential("writer", WRITER, frozenset({"dlq:write"})),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def rt(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return make_runtime(redis_url, tmp_path_factory.mktemp("security"))


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_api(rt, credentials=CREDENTIALS)) as c:
        yield c


def guarded_calls(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every route of the app that is not open, path parameters filled."""
    calls = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if not isinstance(route, APIRoute) or route.path in OPEN_ROUTES | SIGNED_ROUTES:
            continue
        if route.path.startswith("/console"):  # a login page and a session cookie, not a
            continue  # bearer token: tests/integration/test_console.py
        path = route.path.replace("{record_id}", "some-record")
        assert route.methods is not None  # an APIRoute's are set when it is made
        calls += [(method, path) for method in sorted(route.methods)]
    return calls


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": f"Basic {ADMIN}"},
    {"Authorization": f"bearer{ADMIN}"},
], ids=["none", "bare", "empty", "wrong", "basic", "no-space"])
def test_every_guarded_route_is_401_without_a_valid_token(
        client: TestClient, headers: dict[str, str]) -> None:
    calls = guarded_calls(client)
    assert {"/events", "/events/batch", "/metrics", "/dlq", "/dlq/purge", "/dlq/replay",
            "/dlq/some-record"} <= {p for _, p in calls}
    for method, path in calls:
        response = client.request(method, path, json={"all": True, "yes": True},
                                  headers=headers)
        assert response.status_code == 401, (method, path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"


def test_an_api_without_tokens_lets_nobody_in(rt: Runtime) -> None:
    with TestClient(create_api(rt)) as c:
        for method, path in guarded_calls(c):
            assert c.request(method, path, json={"all": True, "yes": True}).status_code == 401
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("token", ["", "   ", "short"])
def test_create_api_refuses_a_weak_token(rt: Runtime, token: str) -> None:
    with pytest.raises(ConfigError):
        create_api(rt, token=token)
    with pytest.raises(ConfigError):
        create_api(rt, tokens={"ops": token})


def test_every_route_is_open_to_the_all_scopes_token(client: TestClient) -> None:
    for method, path in guarded_calls(client):
        response = client.request(method, path, json={}, headers=bearer(ADMIN))
        assert response.status_code not in (401, 403), (method, path)


@pytest.mark.parametrize(("token", "method", "path", "body"), [
    (INGEST, "GET", "/dlq", None),
    (INGEST, "GET", "/dlq/stats", None),
    (INGEST, "GET", "/dlq/audit", None),
    (INGEST, "GET", "/dlq/some-record", None),
    (INGEST, "POST", "/dlq/replay", {"all": True}),
    (INGEST, "POST", "/dlq/purge", {"all": True, "yes": True}),
    (READER, "POST", "/events", {"type": "demo.ok", "source": "s"}),
    (READER, "POST", "/events/batch", [{"type": "demo.ok", "source": "s"}]),
    (READER, "POST", "/dlq/replay", {"all": True}),
    (READER, "POST", "/dlq/purge", {"all": True, "yes": True}),
    (WRITER, "GET", "/dlq", None),
    (WRITER, "POST", "/events", {"type": "demo.ok", "source": "s"}),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "")
def test_a_token_without_the_route_scope_is_403(
        client: TestClient, token: str, method: str, path: str, body: object) -> None:
    response = client.request(method, path, json=body, headers=bearer(token))
    assert response.status_code == 403, response.text
    assert "scope" in response.json()["error"]


def test_scoped_tokens_reach_their_routes_and_audit_names_them(client: TestClient) -> None:
    assert client.get("/dlq", headers=bearer(READER)).status_code == 200
    assert client.post("/events", json={"type": "demo.ok", "source": "s"},
                       headers=bearer(INGEST)).status_code == 202
    nothing = {"ids": [str(uuid.uuid4())]}
    assert client.post("/dlq/replay", json=nothing, headers=bearer(WRITER)).status_code == 200
    assert client.post("/dlq/purge", json={**nothing, "yes": True},
                       headers=bearer(WRITER)).status_code == 200
    audit = client.get("/dlq/audit", params={"limit": 2}, headers=bearer(READER)).json()
    assert [(e["action"], e["by"]) for e in audit] == [("purge", "token:writer"),
                                                       ("replay", "token:writer")]


def test_a_source_limited_token_publishes_only_for_its_sources(client: TestClient) -> None:
    own = client.post("/events", json={"type": "demo.ok", "source": "game-server"},
                      headers=bearer(GAME))
    assert own.status_code == 202
    other = client.post("/events", json={"type": "demo.ok", "source": "billing"},
                        headers=bearer(GAME))
    assert other.status_code == 403
    assert other.json()["reason"] == "forbidden_source"
    assert other.json()["errors"][0]["field"] == "source"
    batch = client.post("/events/batch", headers=bearer(GAME), json=[
        {"type": "demo.ok", "source": "game-lobby"}, {"type": "demo.ok", "source": "billing"}])
    assert batch.status_code == 207
    assert [(r["outcome"], r.get("reason")) for r in batch.json()["results"]] == [
        ("accepted", None), ("rejected", "forbidden_source")]


def test_a_source_limited_token_cannot_claim_another_sources_key(client: TestClient) -> None:
    key = f"order-{uuid.uuid4()}"
    squat = client.post("/events", headers=bearer(GAME), json={
        "type": "demo.ok", "source": "billing", "idempotency_key": key})
    assert squat.status_code == 403
    real = client.post("/events", headers=bearer(INGEST), json={
        "type": "demo.ok", "source": "billing", "idempotency_key": key})
    assert real.status_code == 202
    assert real.json()["outcome"] == "accepted"


def test_every_route_of_the_app_is_in_the_scope_table(client: TestClient) -> None:
    served = app_routes(client.app)
    assert served == set(ROUTES), (
        f"new: {sorted(served - set(ROUTES))}, gone: {sorted(set(ROUTES) - served)}; say "
        "what each needs in tests/integration/route_scopes.py (the fuzz tests then check it)")


def test_no_state_changing_route_is_open(client: TestClient) -> None:
    for (method, path), need in ROUTES.items():
        if state_changing(method):
            assert need.kind != "open", (method, path)
    for method, path in ROUTES:
        if method == "*":  # a mount of static files: nothing but GET and HEAD
            assert client.post(f"{path}/swagger-ui.css").status_code == 405
            assert client.get(f"{path}/swagger-ui.css").status_code == 200


def test_openapi_documents_the_bearer_scheme(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
