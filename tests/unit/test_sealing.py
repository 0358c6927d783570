"""DLQ events sealed with the first key, opened by any; without a key, metadata only."""

from __future__ import annotations

import orjson
import pytest
from cryptography.fernet import Fernet

from pipeline.dlq.sealing import (
    ENCRYPTED,
    ENV_VAR,
    is_sealed,
    key_problems,
    open_record,
    seal_record,
    sealer_from,
)
from pipeline.errors import ConfigError

CARD = "4111111111111111"
EVENT = {"id": "e1", "type": "order.paid", "source": "shop", "occurred_at": "2026-01-01T00:00Z",
         "idempotency_key": "order-7", "payload": {"card": {"number": CARD}, "sku": "x"}}
RECORD = {"id": "r1", "event": EVENT, "handler": "h", "message": f"card {CARD} declined",
          "traceback": f"ValueError: card {CARD} declined\n"}
OLD, NEW = Fernet.generate_key().decode(), Fernet.generate_key().decode()


def test_without_keys_records_are_stored_as_they_are() -> None:
    assert sealer_from({}) is None
    assert sealer_from({ENV_VAR: " , "}) is None
    assert seal_record(RECORD, None, ["payload.card"]) is RECORD


def test_a_sealed_record_holds_no_payload_or_key_in_the_clear_and_opens_whole() -> None:
    keys = sealer_from({ENV_VAR: NEW})
    stored = seal_record(RECORD, keys, ["payload.card"])
    text = orjson.dumps(stored).decode()
    assert CARD not in text
    assert "order-7" not in text
    assert "sku" not in text
    assert {k: stored["event"][k] for k in ("id", "type", "source")} == {
        "id": "e1", "type": "order.paid", "source": "shop"}  # listings and filters read these
    opened = open_record(stored, keys)
    assert opened["event"] == EVENT
    assert not is_sealed(opened["event"])


def test_failure_text_is_stored_masked_when_sealing() -> None:
    stored = seal_record(RECORD, sealer_from({ENV_VAR: NEW}), ["payload.card"])
    assert stored["message"] == "card [redacted] declined"
    assert CARD not in stored["traceback"]


def test_a_reader_without_the_key_sees_metadata_and_the_payload_as_encrypted() -> None:
    stored = seal_record(RECORD, sealer_from({ENV_VAR: OLD}), ["payload.card"])
    for reader in (None, sealer_from({ENV_VAR: NEW})):
        shown = open_record(stored, reader)
        assert shown["event"]["payload"] == ENCRYPTED
        assert shown["event"]["type"] == "order.paid"
        assert is_sealed(shown["event"])
        assert CARD not in orjson.dumps(shown).decode()


def test_rotation_the_first_key_seals_and_every_key_opens() -> None:
    by_old = seal_record(RECORD, sealer_from({ENV_VAR: OLD}), [])
    rotating = sealer_from({ENV_VAR: f"{NEW},{OLD}"})
    assert open_record(by_old, rotating)["event"] == EVENT  # old records still open
    by_rotating = seal_record(RECORD, rotating, [])
    assert open_record(by_rotating, sealer_from({ENV_VAR: NEW}))["event"] == EVENT
    assert is_sealed(open_record(by_rotating, sealer_from({ENV_VAR: OLD}))["event"])


def test_an_altered_token_does_not_open() -> None:
    keys = sealer_from({ENV_VAR: NEW})
    stored = seal_record(RECORD, keys, [])
    token = stored["event"]["sealed"]
    altered = {**stored, "event": {**stored["event"], "sealed": token[:-4] + "AAAA"}}
    assert is_sealed(open_record(altered, keys)["event"])


def test_a_key_that_is_not_a_fernet_key_is_refused_naming_the_variable_not_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        sealer_from({ENV_VAR: f"{NEW},not-a-key-but-a-secret"})
    assert f"{ENV_VAR}[1]" in str(info.value)
    assert "not-a-key-but-a-secret" not in str(info.value)
    assert [p.field for p in key_problems({ENV_VAR: "short"})] == [f"{ENV_VAR}[0]"]
    assert key_problems({ENV_VAR: NEW}) == []
