"""Every DLQ view masks redact_paths; the stored record keeps the whole event."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.core.redact import MASK
from pipeline.core.retry import Reason
from pipeline.dlq.record import DeadLetterRecord
from pipeline.http.api import create_api
from pipeline.worker.runtime import Runtime
from tests.integration.test_api import make_runtime

TOKEN = "redaction-token-0123456789abcdef"
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]*)"')
PATHS = ["payload.card.number", "payload.*.token"]
CARD = "4111111111111111"
SECRET = "tok-0123456789"


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("redaction")


@pytest.fixture(scope="module")
def rt(redis_url: str, tmp: Path) -> Runtime:
    runtime = make_runtime(redis_url, tmp, redact_paths=PATHS)
    now = datetime.now(UTC)
    runtime.dlq.put(DeadLetterRecord(
        id="redact-record-1", event={"id": "ev-redact-1", "type": "demo.ok", "source": "shop",
                                     "payload": {"card": {"number": CARD, "exp": "12/30"},
                                                 "user": {"token": SECRET}}},
        tier="standard", handler="demo.ok", reason=Reason.PERMANENT_ERROR, attempts=1,
        exception="ValueError", message="boom", traceback="", first_failed_at=now,
        last_failed_at=now, worker="w", task_id="t1", queue="standard"))
    runtime.dlq.put(DeadLetterRecord(
        id="redact-record-2", event={"id": "ev-redact-2", "type": "demo.ok", "source": "shop",
                                     "payload": {"card": {"number": CARD}}},
        tier="standard", handler="demo.leaky", reason=Reason.PERMANENT_ERROR, attempts=1,
        exception="ValueError", message=f"card {CARD} declined",
        traceback=f"Traceback (most recent call last):\nValueError: card {CARD} declined\n",
        first_failed_at=now, last_failed_at=now, worker="w", task_id="t2", queue="standard"))
    return runtime


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_api(rt, token=TOKEN)) as c:
        yield c


def assert_masked(event: dict[str, object]) -> None:
    text = json.dumps(event)
    assert CARD not in text
    assert SECRET not in text
    assert event["payload"] == {"card": {"number": MASK, "exp": "12/30"},
                                "user": {"token": MASK}}


def test_http_list_and_show_mask_the_paths(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    listed = client.get("/dlq", headers=auth).json()
    (record,) = [r for r in listed if r["id"] == "redact-record-1"]
    assert_masked(record["event"])
    assert_masked(client.get("/dlq/redact-record-1", headers=auth).json()["event"])


def test_http_views_mask_the_paths_values_in_failure_text(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    shown = client.get("/dlq/redact-record-2", headers=auth).json()
    assert shown["message"] == f"card {MASK} declined"
    assert f"ValueError: card {MASK} declined" in shown["traceback"]
    for path in ("/dlq", "/dlq/stats", "/dlq/redact-record-2"):
        body = client.get(path, headers=auth).text
        assert CARD not in body, path
    stats = client.get("/dlq/stats", headers=auth).json()
    assert any(MASK in s["message"] for s in stats if s["handler"] == "demo.leaky")


def test_console_pages_mask_the_paths_values_in_failure_text(client: TestClient) -> None:
    form = client.get("/console/login")
    nonce = CSRF_FIELD.search(form.text)
    assert nonce is not None
    client.post("/console/login", data={"token": TOKEN, "csrf": nonce.group(1)})
    groups = client.get("/console")
    record = client.get("/console/records/redact-record-2")
    assert (groups.status_code, record.status_code) == (200, 200)
    for page in (groups, record, client.get("/console/records?handler=demo.leaky")):
        assert CARD not in page.text
    assert f"card {MASK} declined" in record.text
    assert f"ValueError: card {MASK} declined" in record.text


def test_the_stored_record_keeps_the_whole_event_for_replay(rt: Runtime) -> None:
    (stored,) = [r for r in rt.dlq.iter_records() if r.id == "redact-record-1"]
    assert stored.event["payload"]["card"]["number"] == CARD


def test_cli_list_json_and_show_mask_the_paths(rt: Runtime, redis_url: str, tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PIPELINE_BROKER_URL=redis_url, PIPELINE_CONFIG=str(tmp / "pipeline.toml"),
               PIPELINE_REDACT_PATHS=json.dumps(PATHS))

    def dlq(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pipeline", "dlq", *args],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = json.loads(dlq("list", "--json"))
    (record,) = [r for r in listed if r["id"] == "redact-record-1"]
    assert_masked(record["event"])
    shown = dlq("show", "redact-record-1")
    assert CARD not in shown
    assert SECRET not in shown
    assert MASK in shown
    for args in (("list",), ("list", "--json"), ("stats",), ("stats", "--json"),
                 ("show", "redact-record-2")):
        out = dlq(*args)
        assert "demo.leaky" in out or "card" in out, args
        assert CARD not in out, args
