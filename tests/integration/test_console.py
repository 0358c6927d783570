"""The DLQ console over HTTP (TestClient) against real workers: who gets in, filters,
dry run then replay (processed once), purge with confirmation, audit entries."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx2 as httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.core.tokens import Credential
from pipeline.demo import fixed_key
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from pipeline.http.api import create_api
from pipeline.http.console.session import SESSION_COOKIE
from tests.integration.support import Stack, wait_for, write_config

OPS = "ops-console-token-0123456789"
READER = "reader-console-token-0123456789"
INGEST = "ingest-console-token-0123456789"
CREDENTIALS = [Credential("ops", OPS), Credential("reader", READER, frozenset({"dlq:read"})),
               Credential("ingest", INGEST, frozenset({"ingest"}))]
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console")
    s = Stack(redis_url, write_config(tmp / "pipeline.toml"), tmp)
    try:
        s.start_workers("standard")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def api(stack: Stack) -> FastAPI:
    return create_api(stack.rt, credentials=CREDENTIALS)


@pytest.fixture
def client(api: FastAPI) -> Iterator[TestClient]:
    with TestClient(api, follow_redirects=False) as c:
        yield c


def login(client: TestClient, token: str) -> httpx.Response:
    form = client.get("/console/login")
    match = CSRF_FIELD.search(form.text)
    assert match is not None
    return client.post("/console/login", data={"token": token, "csrf": match.group(1)})


def csrf_of(page: httpx.Response) -> str:
    match = CSRF_FIELD.search(page.text)
    assert match is not None, page.text
    return match.group(1)


def dead(stack: Stack, ids: list[str | None], timeout_s: float = 60) -> None:
    wanted = {i for i in ids if i}
    wait_for(lambda: wanted <= {r.event_id for r in stack.rt.dlq.iter_records()}, timeout_s,
             f"{len(wanted)} records in the DLQ")


@pytest.mark.parametrize("path", ["/console", "/console/records", "/console/records/abc"])
def test_without_a_session_every_page_redirects_to_login(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


@pytest.mark.parametrize("path", ["/console/replay", "/console/purge", "/console/logout"])
def test_without_a_session_every_form_is_401(client: TestClient, path: str) -> None:
    response = client.post(path, data={"fingerprint": "abc", "csrf": "x", "step": "confirm"})
    assert response.status_code == 401
    assert "/console/login" in response.text


def test_a_wrong_token_is_refused_and_sets_no_session(client: TestClient) -> None:
    response = login(client, "wrong-token-0123456789abcdef")
    assert response.status_code == 401
    assert "Wrong token" in response.text
    assert SESSION_COOKIE not in client.cookies
    assert client.get("/console").status_code == 303


def test_a_token_without_dlq_read_is_refused(client: TestClient) -> None:
    response = login(client, INGEST)
    assert response.status_code == 403
    assert "dlq:read" in response.text
    assert SESSION_COOKIE not in client.cookies


def test_login_without_its_csrf_token_is_refused(client: TestClient) -> None:
    client.get("/console/login")
    response = client.post("/console/login", data={"token": OPS})
    assert response.status_code == 403
    assert SESSION_COOKIE not in client.cookies


def test_the_session_cookie_is_httponly_strict_signed_and_holds_no_token(
        client: TestClient) -> None:
    response = login(client, OPS)
    assert response.status_code == 303
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie
    assert "samesite=strict" in set_cookie
    assert OPS not in response.headers["set-cookie"]
    page = client.get("/console")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "token <strong>ops</strong>" in page.text
    value = client.cookies[SESSION_COOKIE]
    assert value.startswith("eyJ")  # base64 of JSON: flipping its first byte breaks the MAC
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, "x" + value[1:])
    assert client.get("/console").status_code == 303


@pytest.mark.parametrize("path", ["/console/replay", "/console/purge", "/console/logout"])
@pytest.mark.parametrize("csrf", [None, "wrong"])
def test_a_form_without_the_right_csrf_token_is_403(
        client: TestClient, path: str, csrf: str | None) -> None:
    login(client, OPS)
    data = {"type": "demo.invalid", "step": "confirm"} | ({"csrf": csrf} if csrf else {})
    response = client.post(path, data=data)
    assert response.status_code == 403
    assert "CSRF" in response.text


def test_a_reader_sees_but_cannot_act(client: TestClient) -> None:
    login(client, READER)
    page = client.get("/console/records", params={"type": "demo.invalid"})
    assert page.status_code == 200
    assert "Purge" not in page.text
    response = client.post("/console/purge", data={"type": "demo.invalid", "step": "confirm",
                                                   "csrf": csrf_of(page)})
    assert response.status_code == 403
    assert "dlq:write" in response.text


def test_filters_select_records_and_a_record_shows_whole(stack: Stack,
                                                         client: TestClient) -> None:
    invalid = stack.publish("demo.invalid", payload={"n": 1})
    typed = stack.publish("demo.typed", payload={"user_id": "x", "amount": 1})
    dead(stack, [invalid.id, typed.id])
    login(client, OPS)

    def listed(**params: str) -> str:
        page = client.get("/console/records", params=params)
        assert page.status_code == 200, page.text
        return page.text

    assert str(invalid.id) in listed(type="demo.invalid")
    assert str(typed.id) not in listed(type="demo.invalid")
    assert str(typed.id) in listed(reason="invalid_payload", handler="demo.typed")
    assert str(invalid.id) not in listed(reason="invalid_payload")
    assert str(invalid.id) in listed(tier="standard", type="demo.invalid")
    assert "<strong>0</strong> record(s) match" in listed(tier="critical", type="demo.invalid")
    assert "<strong>0</strong> record(s) match" in listed(since="2999-01-01T00:00")
    assert str(invalid.id) in listed(until="2999-01-01T00:00", type="demo.invalid")
    assert client.get("/console/records", params={"reason": "nope"}).status_code == 422
    (record,) = stack.dlq_for(str(invalid.id))
    assert f"<code>{record_fingerprint(record)}</code>" in client.get("/console").text
    shown = client.get(f"/console/records/{record.id}")
    assert shown.status_code == 200
    assert "Traceback" in shown.text
    assert "demo.invalid can never succeed" in shown.text
    assert '<dd id="attempts">1</dd>' in shown.text
    assert "&#34;n&#34;: 1" in shown.text  # the event, escaped


def test_an_action_without_a_filter_is_refused(client: TestClient) -> None:
    page = client.get("/console/login")
    login(client, OPS)
    page = client.get("/console")
    response = client.post("/console/replay", data={"step": "dry-run", "csrf": csrf_of(page)})
    assert response.status_code == 422


def test_dry_run_changes_nothing_then_confirmed_replay_processes_each_event_once(
        stack: Stack, client: TestClient) -> None:
    stack.state.delete(fixed_key("demo.fail"))
    ids = [stack.publish("demo.fail").id for _ in range(5)]
    dead(stack, ids)
    fp = record_fingerprint(stack.dlq_for(str(ids[0]))[0])
    login(client, OPS)
    group = client.get("/console/records", params={"fingerprint": fp})
    assert "Replay" in group.text
    stack.state.set(fixed_key("demo.fail"), "1")  # the fix is deployed
    try:
        before = stack.rt.dlq.depth()
        dry = client.post("/console/replay", data={"fingerprint": fp, "step": "dry-run",
                                                   "rate": "500", "csrf": csrf_of(group)})
        assert dry.status_code == 200, dry.text
        assert "would be replayed" in dry.text
        assert "Replay 5 record(s)" in dry.text
        assert stack.rt.dlq.depth() == before
        assert all(stack.effects(str(i)) == 0 for i in ids)
        audit = Replayer(stack.rt).audit_entries(1)[0]
        assert (audit["action"], audit["dry_run"], audit["by"]) == ("replay", True, "token:ops")
        assert 'name="rate" value="500"' in dry.text  # the option goes on to the confirm form

        done = client.post("/console/replay", data={"fingerprint": fp, "step": "confirm",
                                                    "rate": "500", "csrf": csrf_of(dry)})
        assert done.status_code == 200, done.text
        assert "<strong>5</strong> record(s) replayed" in done.text
        for event_id in ids:
            stack.wait_effect(str(event_id), timeout_s=30)
        time.sleep(0.5)
        assert all(stack.effects(str(i)) == 1 for i in ids)
        assert "0</strong> record(s) match" in client.get(
            "/console/records", params={"fingerprint": fp}).text
        audit = Replayer(stack.rt).audit_entries(1)[0]
        assert (audit["action"], audit["dry_run"], audit["replayed"], audit["by"]) == (
            "replay", False, 5, "token:ops")
        assert audit["filter"] == {"fingerprint": fp}
    finally:
        stack.state.delete(fixed_key("demo.fail"))


def test_replay_to_an_unknown_tier_is_refused(stack: Stack, client: TestClient) -> None:
    login(client, OPS)
    page = client.get("/console")
    response = client.post("/console/replay", data={
        "type": "demo.invalid", "to_tier": "nope", "step": "dry-run", "csrf": csrf_of(page)})
    assert response.status_code == 422


def test_purge_asks_for_confirmation_naming_the_count_then_purges(
        stack: Stack, client: TestClient) -> None:
    ids = [stack.publish("demo.invalid").id for _ in range(3)]
    dead(stack, ids)
    count = sum(r.event.get("type") == "demo.invalid" for r in stack.rt.dlq.iter_records())
    login(client, OPS)
    page = client.get("/console/records", params={"type": "demo.invalid"})
    preview = client.post("/console/purge", data={"type": "demo.invalid", "step": "preview",
                                                  "csrf": csrf_of(page)})
    assert preview.status_code == 200
    assert f"Purge {count} record(s)" in preview.text
    assert all(stack.dlq_for(str(i)) for i in ids)  # nothing deleted before confirming
    done = client.post("/console/purge", data={"type": "demo.invalid", "step": "confirm",
                                               "csrf": csrf_of(preview)})
    assert f"<strong>{count}</strong> record(s) purged" in done.text
    assert not any(stack.dlq_for(str(i)) for i in ids)
    audit = Replayer(stack.rt).audit_entries(1)[0]
    assert (audit["action"], audit["purged"], audit["by"]) == ("purge", count, "token:ops")


def test_logout_ends_the_session(client: TestClient) -> None:
    login(client, OPS)
    page = client.get("/console")
    response = client.post("/console/logout", data={"csrf": csrf_of(page)})
    assert response.status_code == 303
    assert client.get("/console").status_code == 303


def test_a_dry_run_checks_only_the_oldest_records_and_says_so(
        stack: Stack, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = [stack.publish("demo.typed", payload={"n": "not a number"}).id for _ in range(4)]
    dead(stack, ids)
    fp = record_fingerprint(stack.dlq_for(str(ids[0]))[0])
    group_size = stack.rt.dlq.query.select(RecordFilter(fingerprint=fp))[0]
    monkeypatch.setattr("pipeline.http.console.DRY_RUN_CHECKS", 2)
    login(client, OPS)
    page = client.get("/console/records", params={"fingerprint": fp})
    dry = client.post("/console/replay", data={"fingerprint": fp, "step": "dry-run",
                                               "csrf": csrf_of(page)})
    assert dry.status_code == 200, dry.text
    assert f"Up to <strong>{group_size - 2}</strong> of\n{group_size} matching" in dry.text
    assert "The oldest 2 were checked" in dry.text
    assert f"Replay up to {group_size - 2} record(s)" in dry.text
    audit = Replayer(stack.rt).audit_entries(1)[0]
    assert (audit["matched"], audit["checked"], audit["would_fail"]) == (group_size, 2, 2)
