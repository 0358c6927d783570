"""DLQ events encrypted at rest (PIPELINE_DLQ_KEYS), against a real worker: what the
broker holds, readers with and without the key, rotation, and replay after a fix."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from collections.abc import Iterator

import orjson
import pytest
from cryptography.fernet import Fernet

from pipeline.app import create_app
from pipeline.demo import fixed_key
from pipeline.dlq.replay import Replayer
from pipeline.dlq.sealing import ENCRYPTED, ENV_VAR
from pipeline.dlq.triage import RecordFilter
from pipeline.worker.runtime import Runtime, runtime_for
from tests.integration.support import Stack, wait_for, write_config

CARD = "4111111111111111"  # a payload value that must not be readable on the broker
OLD_KEY = Fernet.generate_key().decode()  # what the worker seals with
NEW_KEY = Fernet.generate_key().decode()  # rotated in: first in the readers' list


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sealing")
    config = write_config(tmp / "pipeline.toml")
    config.write_text('redact_paths = ["payload.card"]\n' + config.read_text())
    s = Stack(redis_url, config, tmp)
    try:
        s.start_worker("standard", env={ENV_VAR: OLD_KEY})
        yield s
    finally:
        s.stop()


def reader(stack: Stack, monkeypatch: pytest.MonkeyPatch, keys: str | None) -> Runtime:
    """A runtime of this test process reading the DLQ with ``keys`` (None: unset)."""
    if keys is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, keys)
    return runtime_for(create_app(stack.rt.settings, main=f"reader-{uuid.uuid4().hex[:8]}"))


def dead_letter(stack: Stack, type_: str) -> str:
    event_id = str(uuid.uuid4())
    stack.publish(type_, id=event_id, payload={"card": CARD, "sku": "x"})
    wait_for(lambda: any(event_id.encode() in raw for raw in stored(stack)), 30,
             f"a DLQ record for {event_id}")
    return event_id


def stored(stack: Stack) -> list[bytes]:
    """Every DLQ record's JSON as the broker holds it (kombu's base64 body decoded)."""
    raws: list[bytes] = stack.state.lrange(stack.rt.settings.dead_letter_queue, 0, -1)  # type: ignore[assignment]
    return [base64.b64decode(orjson.loads(raw)["body"]) for raw in raws]


def test_the_broker_holds_no_payload_value_and_the_key_opens_the_whole_event(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    event_id = dead_letter(stack, "demo.echo")  # its error quotes the payload too
    (body,) = [b for b in stored(stack) if event_id.encode() in b]
    assert CARD not in body.decode()
    assert orjson.loads(body)["event"]["type"] == "demo.echo"
    (record,) = [r for r in reader(stack, monkeypatch, OLD_KEY).dlq.iter_records()
                 if r.event_id == event_id]
    assert record.event["payload"] == {"card": CARD, "sku": "x"}
    assert "[redacted]" in record.message  # failure text was stored masked


def test_without_the_key_a_record_is_listed_encrypted_and_replay_refuses(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    event_id = dead_letter(stack, "demo.invalid")
    rt = reader(stack, monkeypatch, None)
    (record,) = [r for r in rt.dlq.iter_records() if r.event_id == event_id]
    assert (record.event["type"], record.event["payload"]) == ("demo.invalid", ENCRYPTED)
    summary = Replayer(rt).replay(RecordFilter(ids=frozenset({event_id})), by="test",
                                  force=True)
    assert (summary.encrypted, summary.replayed) == (1, 0)
    assert ENV_VAR in summary.as_dict()["error"]
    assert any(r.event_id == event_id for r in rt.dlq.iter_records())  # kept
    env = {**stack.env()}
    env.pop(ENV_VAR, None)
    done = subprocess.run([sys.executable, "-m", "pipeline", "dlq", "replay", event_id],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert ENV_VAR in done.stderr


def test_after_rotation_old_records_open_and_replay_after_a_fix_runs_once(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    event_id = dead_letter(stack, "demo.fail")
    rt = reader(stack, monkeypatch, f"{NEW_KEY},{OLD_KEY}")
    stack.state.set(fixed_key("demo.fail"), 1)
    try:
        summary = Replayer(rt).replay(RecordFilter(ids=frozenset({event_id})), by="test")
        assert (summary.replayed, summary.encrypted) == (1, 0)
        assert stack.wait_effect(event_id) == 1
    finally:
        stack.state.delete(fixed_key("demo.fail"))
    assert not any(event_id.encode() in raw for raw in stored(stack))
