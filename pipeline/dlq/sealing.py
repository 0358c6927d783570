"""Optional encryption of the events stored in DLQ records: ``PIPELINE_DLQ_KEYS``.

The variable holds Fernet keys (``python -c "from cryptography.fernet import Fernet;
print(Fernet.generate_key().decode())"``), comma-separated while rotating: the first
encrypts, every one decrypts (``MultiFernet``). Unset or empty: records are stored
as before. The variable is read from the environment only, never from a config file.

With keys, a record is written (:func:`seal_record`) with its event replaced by the
fields listings filter on (:data:`CLEAR_FIELDS`) plus ``sealed``, a Fernet token of
the whole event (AES-128-CBC with HMAC-SHA256: confidentiality and integrity); its
``message`` and ``traceback`` are stored with the event's ``redact_paths`` values
masked, as every view shows them. A reader (:func:`open_record`) whose keys open
the token gets the whole event back, so replay and ``show`` are unchanged; a reader
without such a key gets the clear fields, ``payload`` shown as :data:`ENCRYPTED` and
``encrypted: true`` (:func:`is_sealed`), and replay refuses that record, naming the
variable. :class:`~pipeline.dlq.queue.DeadLetterQueue` calls both, in its one write
and its one read path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.core.redact import mask_text, secrets_in
from pipeline.errors import ConfigError, FieldProblem

__all__ = ["CLEAR_FIELDS", "ENCRYPTED", "ENV_VAR", "Sealer", "is_sealed", "key_problems",
           "open_record", "seal_record", "sealer_from"]

ENV_VAR = "PIPELINE_DLQ_KEYS"  # Fernet keys, comma-separated: the first encrypts
ENCRYPTED = "[encrypted]"  # what an event's payload shows to a reader without the key
SEALED_KEY = "sealed"  # the stored event's field holding the Fernet token
ENCRYPTED_FLAG = "encrypted"  # set on an event no key of the reader opened
# event fields kept in the clear: what DLQ listings, filters and fingerprints read
CLEAR_FIELDS = ("id", "type", "source", "occurred_at", "tier", "priority")
INSTALL_HINT = "pip install 'celery-event-pipeline[encryption]'"


class Sealer:
    """Encrypts with the first key, decrypts with any (Fernet tokens)."""

    def __init__(self, keys: Sequence[str]) -> None:
        from cryptography.fernet import Fernet, MultiFernet

        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    def seal(self, data: bytes) -> str:
        return self._fernet.encrypt(data).decode()

    def open(self, token: str) -> bytes | None:
        """The sealed bytes, or None when no key opens (or the token was altered)."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode())
        except (InvalidToken, ValueError, TypeError):
            return None


def sealer_from(environ: Mapping[str, str]) -> Sealer | None:
    """The sealer :data:`ENV_VAR` configures, or None when it is unset or empty. A key
    that is not a Fernet key is a :class:`ConfigError` naming the variable, never the
    value; so is the variable set without the ``cryptography`` package."""
    keys = [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
    if not keys:
        return None
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ConfigError([FieldProblem(ENV_VAR, None, f"set, but encryption needs the "
                                                       f"cryptography package: {INSTALL_HINT}")]
                          ) from None
    problems = []
    for i, key in enumerate(keys):
        try:
            Sealer([key])
        except (ValueError, TypeError):
            problems.append(FieldProblem(f"{ENV_VAR}[{i}]", None,
                                         "not a Fernet key (32 url-safe base64-encoded bytes); "
                                         "make one with cryptography's Fernet.generate_key()"))
    if problems:
        raise ConfigError(problems)
    return Sealer(keys)


def key_problems(environ: Mapping[str, str]) -> list[FieldProblem]:
    """What is wrong with :data:`ENV_VAR` (every process checks it at start)."""
    try:
        sealer_from(environ)
    except ConfigError as exc:
        return list(exc.problems)
    return []


def seal_record(data: dict[str, Any], sealer: Sealer | None,
                redact_paths: Sequence[str]) -> dict[str, Any]:
    """A record's JSON form as stored: ``data`` itself without a sealer."""
    event = data.get("event")
    if sealer is None or not isinstance(event, dict) or SEALED_KEY in event:
        return data
    clear = {k: event[k] for k in CLEAR_FIELDS if k in event}
    found = secrets_in(event, redact_paths)
    texts = {k: mask_text(data[k], found) for k in ("message", "traceback")
             if isinstance(data.get(k), str)}
    return {**data, **texts, "event": {**clear, SEALED_KEY: sealer.seal(orjson.dumps(event))}}


def open_record(data: dict[str, Any], sealer: Sealer | None) -> dict[str, Any]:
    """A stored record's JSON form as read: its whole event when ``sealer`` opens it,
    else the clear fields with the payload shown :data:`ENCRYPTED`."""
    event = data.get("event")
    if not isinstance(event, dict) or not isinstance(event.get(SEALED_KEY), str):
        return data
    opened = sealer.open(event[SEALED_KEY]) if sealer is not None else None
    if opened is not None:
        return {**data, "event": orjson.loads(opened)}
    clear = {k: v for k, v in event.items() if k != SEALED_KEY}
    return {**data, "event": {**clear, "payload": ENCRYPTED, ENCRYPTED_FLAG: True}}


def is_sealed(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` (of a record as read) is still encrypted: no key opened it."""
    return event.get(ENCRYPTED_FLAG) is True
