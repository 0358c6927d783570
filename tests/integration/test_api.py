"""The HTTP ingest API in-process (ASGI) against a real broker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.http.api import create_api
from pipeline.local.embedded import EmbeddedServer, start_server
from pipeline.worker.runtime import Runtime, runtime_for
from tests.integration.support import write_config

TOKEN = "s3cret-token-for-the-api-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY_TIER = """
[tiers.tiny]
concurrency = 1
max_depth = 3
overflow = "reject"
soft_time_limit_s = 4
time_limit_s = 5
"""


def make_runtime(url: str, tmp: Path, **overrides: object) -> Runtime:
    config = write_config(tmp / "pipeline.toml", prefix=f"{tmp.name}-", extra=TINY_TIER)
    limits: dict[str, object] = {"api_max_body_bytes": 64 * 1024, "api_max_batch": 50}
    settings = load_settings(config, broker_url=url, admission_cache_s=0.0,
                             **{**limits, **overrides})
    return runtime_for(create_app(settings, main=f"api-{tmp.name}"))


@pytest.fixture(scope="module")
def client(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    rt = make_runtime(redis_url, tmp_path_factory.mktemp("api"))
    with TestClient(create_api(rt, token=TOKEN)) as c:
        yield c


def event(**fields: object) -> dict[str, object]:
    return {"type": "demo.ok", "source": "api-test", **fields}


@pytest.mark.parametrize(("method", "path"), [("post", "/events"), ("post", "/events/batch")])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic czNjcmV0"}])
def test_routes_that_write_refuse_a_missing_or_wrong_token(
    client: TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    response = client.request(method, path, json=event(), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_health_is_open_and_ready_reports_the_broker(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_post_event_is_accepted_with_id_and_tier_then_a_repeat_is_a_duplicate(
    client: TestClient,
) -> None:
    body = event(source="vip-9")
    first = client.post("/events", json=body, headers=AUTH)
    assert first.status_code == 202
    assert first.json()["outcome"] == "accepted"
    assert first.json()["tier"] == "critical"
    again = client.post("/events", json={**body, "id": first.json()["id"]}, headers=AUTH)
    assert again.status_code == 200
    assert again.json()["outcome"] == "duplicate"


def test_invalid_event_gets_422_naming_every_offending_field(client: TestClient) -> None:
    response = client.post("/events", json={"type": "Bad", "source": "", "priority": 42,
                                            "extra": 1}, headers=AUTH)
    assert response.status_code == 422
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"type", "source", "priority", "extra"}
    values = {e["field"]: e["value"] for e in response.json()["errors"]}
    assert values["type"] == "Bad"
    assert values["priority"] == 42


def test_batch_accepts_valid_items_even_when_others_are_invalid(client: TestClient) -> None:
    items = [event(), {"type": "nope"}, event(), 17]
    response = client.post("/events/batch", json=items, headers=AUTH)
    assert response.status_code == 207
    body = response.json()
    assert [r["outcome"] for r in body["results"]] == ["accepted", "rejected", "accepted",
                                                       "rejected"]
    assert {e["field"] for e in body["results"][1]["errors"]} == {"type", "source"}
    assert body["accepted"] == 2


def test_ndjson_batch_is_accepted(client: TestClient) -> None:
    lines = "\n".join(json.dumps(event()) for _ in range(3)) + "\n{broken\n"
    response = client.post("/events/batch", content=lines,
                           headers={**AUTH, "Content-Type": "application/x-ndjson"})
    assert response.status_code == 207
    assert [r["outcome"] for r in response.json()["results"]] == ["accepted"] * 3 + ["rejected"]


def test_all_accepted_batch_is_202(client: TestClient) -> None:
    response = client.post("/events/batch", json=[event(), event()], headers=AUTH)
    assert response.status_code == 202


def test_oversized_body_is_413(client: TestClient) -> None:
    big = event(payload={"blob": "x" * 70_000})
    assert client.post("/events", json=big, headers=AUTH).status_code == 413


def test_an_event_over_the_per_event_cap_is_413_and_not_echoed(
    redis_url: str, tmp_path: Path,
) -> None:
    rt = make_runtime(redis_url, tmp_path, max_payload_bytes=1024, api_max_body_bytes=1 << 22)
    with TestClient(create_api(rt, token=TOKEN)) as c:
        # over the payload cap plus the envelope: refused before it is parsed
        huge = c.post("/events", json=event(payload={"blob": "x" * (2 << 20)}), headers=AUTH)
        assert huge.status_code == 413
        assert len(huge.content) < 300
        # over the payload cap only: the same status, the value clipped
        over = c.post("/events", json=event(payload={"blob": "x" * 2000}), headers=AUTH)
        assert over.status_code == 413, over.text
        (problem,) = over.json()["errors"]
        assert problem["field"] == "payload"
        assert len(json.dumps(problem["value"])) < 260
        # the batch route keeps its own limit and rejects that item alone
        batch = c.post("/events/batch", json=[event(payload={"blob": "x" * 2000}), event()],
                       headers=AUTH)
        assert batch.status_code == 207
        assert len(batch.content) < 1000


def test_too_many_events_in_a_batch_is_413(client: TestClient) -> None:
    response = client.post("/events/batch", json=[event() for _ in range(51)], headers=AUTH)
    assert response.status_code == 413
    assert "51" in response.json()["error"]


def test_wrong_content_type_is_415(client: TestClient) -> None:
    response = client.post("/events", content=b"type=demo.ok",
                           headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415


def test_body_that_is_not_json_is_422(client: TestClient) -> None:
    response = client.post("/events", content=b"{nope",
                           headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "<document>"


def test_full_tier_answers_429_with_retry_after(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/events", json=event(tier="tiny"), headers=AUTH).status_code == 202
    response = client.post("/events", json=event(tier="tiny"), headers=AUTH)
    assert response.status_code == 429
    assert response.json()["reason"] == "tier_full"
    assert int(response.headers["retry-after"]) > 0


def test_openapi_schema_is_served_and_documents_the_event(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]
    assert "type" in body["schema"]["properties"]


# src="...", href="...", url: '...' (Swagger UI's spec), spec-url="..." (ReDoc's)
ASSET_REFERENCE = re.compile(r"""(?:src|href|spec-url)=["']([^"']+)|\burl: *'([^']+)'""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_doc_pages_load_every_asset_from_the_app_itself(
    client: TestClient, page: str,
) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "://" not in html  # no CDN, no font service: nothing from another host
    assets = {a or b for a, b in ASSET_REFERENCE.findall(html)}
    assert len(assets) >= 2  # the page's script and what it renders (CSS, spec)
    for asset in assets:
        assert asset.startswith("/"), asset
        assert not asset.startswith("//"), asset
        served = client.get(asset)
        assert served.status_code == 200, asset
        assert len(served.content) > 100, asset


def test_broker_outage_gives_503_and_recovery_needs_no_restart(tmp_path: Path) -> None:
    server: EmbeddedServer = start_server(tmp_path / "own-broker", persist=True)
    try:
        rt = make_runtime(server.url, tmp_path, publish_max_retries=0)
        with TestClient(create_api(rt, token=TOKEN)) as c:
            before = c.post("/events", json=event(), headers=AUTH)
            assert before.status_code == 202
            server.kill()
            assert c.get("/readyz").status_code == 503
            down = c.post("/events", json=event(), headers=AUTH)
            assert down.status_code == 503
            assert "retry-after" in down.headers
            batch = c.post("/events/batch", json=[event(), event()], headers=AUTH)
            assert batch.status_code == 503
            assert batch.json()["accepted"] == []
            server = start_server(tmp_path / "own-broker", port=server.port, persist=True)
            assert c.get("/readyz").status_code == 200
            after = c.post("/events", json=event(), headers=AUTH)
            assert after.status_code == 202
            # What was accepted before the crash survived it (AOF, fsync every second).
            queue = rt.settings.queue_for("standard")
            assert rt.state.llen(queue) == 2
    finally:
        server.stop()
