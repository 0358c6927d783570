"""Signed webhooks from external APIs: verification and mapping, pure.

``POST /webhooks/{name}`` (:mod:`pipeline.http.webhooks`) takes deliveries for each
``[webhooks.NAME]`` of the config. The signature is the credential (no bearer
token): :func:`verify` checks it over the raw body with every active secret, in
constant time, and a delivery that fails any check is 401 without saying which.
Schemes:

=================  ==========================================================
``github``          ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(body)>``
``hmac-sha256``     the same with a configurable header, prefix and encoding
``stripe``          ``Stripe-Signature: t=<ts>,v1=<hex HMAC(ts "." body)>``
``standard``        Standard Webhooks: ``webhook-id``, ``webhook-timestamp``,
                    ``webhook-signature: v1,<base64 HMAC(id "." ts "." body)>``
=================  ==========================================================

A signed timestamp (``stripe``, ``standard``) further than ``tolerance_s`` from
now is refused; within it, and for schemes without one, a replayed delivery is a
duplicate: the provider's delivery id (else the body's SHA-256) is the event's
idempotency key for ``idempotency_window_s``. :func:`event_from` maps a verified
body to an event (``source`` = the webhook's name), which is published like any
other (tiers, rules, DLQ).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import FieldProblem, clip

__all__ = ["DEFAULT_TOLERANCE_S", "WEBHOOK_NAME_PATTERN", "MappingProblem", "WebhookConfig",
           "WebhookSettings", "event_from", "sign_hmac", "sign_standard", "sign_stripe", "verify",
           "webhook_keys"]

Scheme = Literal["github", "stripe", "standard", "hmac-sha256"]
DEFAULT_TOLERANCE_S = 300  # Stripe's and Standard Webhooks' default timestamp tolerance
MIN_SECRET_CHARS = 16  # shortest webhook secret accepted (GitHub's docs example has 26)
MAX_KEY_CHARS = 200  # a longer delivery id becomes its SHA-256 (event keys stop at 256)
WEBHOOK_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"  # a URL path segment and a source
STANDARD_SECRET_PREFIX = "whsec_"  # Standard Webhooks secrets: whsec_<base64 key>
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # what secret_env may name
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")  # {field.path} or {header:Name} in a type template
_DEFAULTS: dict[str, tuple[str, str, str | None]] = {  # scheme -> header, prefix, id header
    "github": ("x-hub-signature-256", "sha256=", "x-github-delivery"),
    "hmac-sha256": ("x-signature", "", None),
    "stripe": ("stripe-signature", "", None),
    "standard": ("webhook-signature", "", "webhook-id"),
}


class WebhookConfig(BaseModel):
    """One webhook source: how its deliveries are signed and become events."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: how deliveries are signed: `github`, `stripe`, `standard` (Standard Webhooks)
    #: or `hmac-sha256` (an HMAC of the body in a header you name).
    scheme: Scheme
    #: environment variable holding the secret; several, comma-separated, are all
    #: accepted while rotating. `standard` secrets are `whsec_<base64>`.
    secret_env: Annotated[str, Field(pattern=_ENV_NAME)]
    #: header carrying the signature. Unset: `X-Hub-Signature-256` (`github`),
    #: `Stripe-Signature`, `webhook-signature`; `X-Signature` for `hmac-sha256`.
    signature_header: str | None = None
    #: `github`, `hmac-sha256`: text before the signature in its header. Unset:
    #: `sha256=` for `github`, none for `hmac-sha256`.
    signature_prefix: str | None = None
    #: `github`, `hmac-sha256`: how the signature is written, `hex` or `base64` (Shopify).
    signature_encoding: Literal["hex", "base64"] = "hex"
    #: header carrying the provider's delivery id, the event's idempotency key. Unset:
    #: `X-GitHub-Delivery` (`github`), `webhook-id` (`standard`), the body's `id` field
    #: (`stripe`); for `hmac-sha256` the body's SHA-256.
    id_header: str | None = None
    #: the event type, fixed or a template of `{field.path}` (from the body) and
    #: `{header:Name}` parts: `"github.{header:X-GitHub-Event}"`, `"stripe.{type}"`.
    type: str | None = None
    #: instead of `type`: the body field (dotted) holding the type, after `type_prefix`.
    type_field: str | None = None
    #: put before `type_field`'s value: `"github."`.
    type_prefix: str = ""
    #: body field (dotted) whose object is the event's payload; unset: the whole body.
    payload_field: str | None = None
    #: `stripe`, `standard`: a signed timestamp further than this from now is refused.
    tolerance_s: Annotated[int, Field(ge=1, le=3600)] = DEFAULT_TOLERANCE_S

    @model_validator(mode="after")
    def _one_type(self) -> WebhookConfig:
        if (self.type is None) == (self.type_field is None):
            raise ValueError("give the event type as type (fixed or a template) or type_field")
        if self.type_prefix and self.type_field is None:
            raise ValueError("type_prefix goes with type_field")
        return self

    @property
    def header(self) -> str:
        return (self.signature_header or _DEFAULTS[self.scheme][0]).lower()

    @property
    def prefix(self) -> str:
        return _DEFAULTS[self.scheme][1] if self.signature_prefix is None else self.signature_prefix

    @property
    def type_template(self) -> str:
        return self.type if self.type is not None else f"{self.type_prefix}{{{self.type_field}}}"


class WebhookSettings(Protocol):
    """What :func:`webhook_keys` reads of :class:`pipeline.config.model.Settings`."""

    @property
    def webhooks(self) -> Mapping[str, WebhookConfig]: ...


def webhook_keys(settings: WebhookSettings, environ: Mapping[str, str] | None = None,
                 ) -> tuple[dict[str, tuple[bytes, ...]], list[FieldProblem]]:
    """Every webhook's HMAC keys from its ``secret_env`` (default ``os.environ``), and
    the problems that keep some from being used (secrets never shown)."""
    env = os.environ if environ is None else environ
    keys: dict[str, tuple[bytes, ...]] = {}
    problems: list[FieldProblem] = []
    for name, cfg in settings.webhooks.items():
        field = f"webhooks.{name}.secret_env"
        secrets = [s.strip() for s in env.get(cfg.secret_env, "").split(",") if s.strip()]
        if not secrets:
            problems.append(FieldProblem(field, cfg.secret_env,
                                         f"${cfg.secret_env} is unset or empty"))
            continue
        found = []
        for n, secret in enumerate(secrets, 1):
            key, why = _key(cfg.scheme, secret)
            if why is not None:
                problems.append(FieldProblem(field, cfg.secret_env,
                                             f"${cfg.secret_env}, secret {n}: {why}"))
            found.append(key)
        keys[name] = tuple(found)
    return keys, problems


def _key(scheme: str, secret: str) -> tuple[bytes, str | None]:
    if scheme != "standard":
        short = len(secret) < MIN_SECRET_CHARS
        return secret.encode(), (f"shorter than {MIN_SECRET_CHARS} characters" if short
                                 else None)
    raw = secret.removeprefix(STANDARD_SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "==", validate=False)
    except (binascii.Error, ValueError):
        return b"", "not whsec_<base64>"
    return key, None if len(key) >= MIN_SECRET_CHARS else "a key under 16 bytes"


def sign_hmac(key: bytes, body: bytes) -> bytes:
    """HMAC-SHA256 of ``body``: what ``github`` and ``hmac-sha256`` sign."""
    return hmac.new(key, body, hashlib.sha256).digest()


def sign_stripe(key: bytes, timestamp: int, body: bytes) -> str:
    """Stripe's ``v1``: hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    return sign_hmac(key, f"{timestamp}.".encode() + body).hex()


def sign_standard(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks' ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``."""
    mac = sign_hmac(key, f"{msg_id}.{timestamp}.".encode() + body)
    return f"v1,{base64.b64encode(mac).decode()}"


def verify(cfg: WebhookConfig, keys: tuple[bytes, ...], headers: Mapping[str, str],
           body: bytes, now_s: float) -> bool:
    """Whether ``body`` with ``headers`` (lower-case names) is signed by one of
    ``keys`` within the tolerance. Every key and offered signature is compared."""
    offered = headers.get(cfg.header, "")
    if cfg.scheme in ("github", "hmac-sha256"):
        sig = _decode(offered, cfg.prefix, cfg.signature_encoding)
        return sig is not None and _any_equal([sign_hmac(k, body) for k in keys], [sig])
    if cfg.scheme == "stripe":
        parts = [p.split("=", 1) for p in offered.split(",") if "=" in p]
        stamps = [v for k, v in parts if k.strip() == "t"]
        if len(stamps) != 1 or not _fresh(stamps[0], now_s, cfg.tolerance_s):
            return False
        sigs = [v.strip().encode() for k, v in parts if k.strip() == "v1"]
        expected = [sign_stripe(k, int(stamps[0]), body).encode() for k in keys]
        return _any_equal(expected, sigs)
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not msg_id or not _fresh(stamp, now_s, cfg.tolerance_s):
        return False
    sigs = [s.encode() for s in offered.split() if s.startswith("v1,")]
    expected = [sign_standard(k, msg_id, int(stamp), body).encode() for k in keys]
    return _any_equal(expected, sigs)


def _decode(offered: str, prefix: str, encoding: str) -> bytes | None:
    if not offered.startswith(prefix):
        return None
    text = offered[len(prefix):].strip()
    try:
        return bytes.fromhex(text) if encoding == "hex" else base64.b64decode(text,
                                                                              validate=True)
    except (ValueError, binascii.Error):
        return None


def _fresh(stamp: str, now_s: float, tolerance_s: int) -> bool:
    stamp = stamp.strip()
    return stamp.isdigit() and len(stamp) <= 12 and abs(now_s - int(stamp)) <= tolerance_s


def _any_equal(expected: list[bytes], offered: list[bytes]) -> bool:
    """Constant time in the values: every pair is compared, no early exit."""
    found = False
    for want in expected:
        for got in offered:
            found |= hmac.compare_digest(want, got)
    return found


class MappingProblem(ValueError):
    """A verified body that cannot become an event: its field and why (HTTP 422)."""

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.problem = {"field": field, "value": clip(str(value), 80), "message": message}


def event_from(cfg: WebhookConfig, name: str, headers: Mapping[str, str], body: bytes,
               document: Any) -> dict[str, Any]:
    """The event for a verified delivery: its type from the template, ``source`` the
    webhook's name, the payload the body (or its ``payload_field``), and the delivery
    id (else the body's SHA-256) as idempotency key. Raises :class:`MappingProblem`."""
    if not isinstance(document, dict):
        raise MappingProblem("<document>", type(document).__name__,
                             "a webhook body must be a JSON object")

    def fill(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref.startswith("header:"):
            value: Any = headers.get(ref[len("header:"):].strip().lower())
        else:
            value = _field(document, ref)
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            raise MappingProblem("type", cfg.type_template,
                                 f"the delivery has no text at {ref!r} for the event type")
        return str(value)

    payload = document if cfg.payload_field is None else _field(document,
                                                                   cfg.payload_field)
    if not isinstance(payload, dict):
        raise MappingProblem("payload", cfg.payload_field,
                             f"{cfg.payload_field!r} is not a JSON object in the body")
    return {"type": _PLACEHOLDER.sub(fill, cfg.type_template), "source": name,
            "payload": payload, "idempotency_key": _delivery_id(cfg, headers, document, body)}


def _field(document: dict[str, Any], path: str) -> Any:
    node: Any = document
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _delivery_id(cfg: WebhookConfig, headers: Mapping[str, str], document: dict[str, Any],
                 body: bytes) -> str:
    header = (cfg.id_header or _DEFAULTS[cfg.scheme][2] or "").lower()
    found: Any = headers.get(header) if header else None
    if found is None and cfg.scheme == "stripe" and cfg.id_header is None:
        found = document.get("id")
    text = found.strip() if isinstance(found, str) else ""
    if text and len(text) <= MAX_KEY_CHARS:
        return text
    return f"sha256:{hashlib.sha256(text.encode() if text else body).hexdigest()}"
