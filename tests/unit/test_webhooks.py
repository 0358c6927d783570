"""Webhook verification against published vectors and reference implementations."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import UTC, datetime

import pytest
import standardwebhooks

from pipeline.config.load import load_settings
from pipeline.core.webhooks import (
    MappingProblem,
    WebhookConfig,
    event_from,
    sign_standard,
    verify,
    webhook_keys,
)
from pipeline.errors import ConfigError

# GitHub's documented example ("Validating webhook deliveries", testing the signature).
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # whsec_ + base64 of a 24-byte key
STRIPE_SECRET = "whsec_test_0123456789abcdefghij"
NOW = 1_764_400_000


def keys_for(scheme: str, secret: str, **more: object) -> tuple[WebhookConfig, tuple[bytes, ...]]:
    settings = load_settings(webhooks={"hook": {"scheme": scheme, "secret_env": "HOOK_SECRET",
                                                "type": "demo.ok", **more}})
    keys, problems = webhook_keys(settings, {"HOOK_SECRET": secret})
    assert problems == []
    return settings.webhooks["hook"], keys["hook"]


def test_githubs_documented_example_verifies() -> None:
    cfg, keys = keys_for("github", GITHUB_SECRET)
    assert verify(cfg, keys, {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, NOW)


@pytest.mark.parametrize("headers", [
    {}, {"x-hub-signature-256": GITHUB_SIGNATURE.removeprefix("sha256=")},
    {"x-hub-signature-256": GITHUB_SIGNATURE[:-1] + "0"},
    {"x-hub-signature-256": "sha256=not-hex"},
])
def test_githubs_example_fails_when_any_part_is_wrong(headers: dict[str, str]) -> None:
    cfg, keys = keys_for("github", GITHUB_SECRET)
    assert not verify(cfg, keys, headers, GITHUB_BODY, NOW)
    assert not verify(cfg, keys, {"x-hub-signature-256": GITHUB_SIGNATURE},
                      GITHUB_BODY + b" ", NOW)


def test_every_comma_separated_secret_verifies_while_rotating() -> None:
    cfg, keys = keys_for("github", f"the-new-secret-0123456789, {GITHUB_SECRET}")
    assert len(keys) == 2
    assert verify(cfg, keys, {"x-hub-signature-256": GITHUB_SIGNATURE}, GITHUB_BODY, NOW)


def test_hmac_sha256_takes_a_header_prefix_and_base64() -> None:
    cfg, keys = keys_for("hmac-sha256", GITHUB_SECRET, signature_header="X-Shopify-Hmac-Sha256",
                         signature_encoding="base64")
    mac = base64.b64encode(hmac.new(GITHUB_SECRET.encode(), b"{}", hashlib.sha256).digest())
    assert verify(cfg, keys, {"x-shopify-hmac-sha256": mac.decode()}, b"{}", NOW)
    assert not verify(cfg, keys, {"x-signature": mac.decode()}, b"{}", NOW)


def test_the_standardwebhooks_signer_is_verified_by_ours() -> None:
    cfg, keys = keys_for("standard", STANDARD_SECRET)
    body = b'{"type": "invoice.paid"}'
    now = time.time()
    signed = standardwebhooks.Webhook(STANDARD_SECRET).sign(
        "msg_p5jXN8AQM9LWM0D4loKWxJek", datetime.fromtimestamp(int(now), UTC), body.decode())
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
               "webhook-timestamp": str(int(now)), "webhook-signature": f"v1,junk {signed}"}
    assert verify(cfg, keys, headers, body, now)
    assert not verify(cfg, keys, {**headers, "webhook-id": "msg_other"}, body, now)


def test_our_standard_signature_is_verified_by_the_standardwebhooks_package() -> None:
    _, keys = keys_for("standard", STANDARD_SECRET)
    body = b'{"type": "invoice.paid"}'
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign_standard(keys[0], "msg_1", now, body)}
    assert standardwebhooks.Webhook(STANDARD_SECRET).verify(body, headers) == {
        "type": "invoice.paid"}


@pytest.mark.parametrize("skew_s", [-301, 301])
def test_a_timestamp_outside_the_tolerance_is_refused(skew_s: int) -> None:
    cfg, keys = keys_for("standard", STANDARD_SECRET)
    stamp = NOW + skew_s
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp),
               "webhook-signature": sign_standard(keys[0], "msg_1", stamp, b"{}")}
    assert not verify(cfg, keys, headers, b"{}", NOW)
    assert verify(cfg, keys, headers, b"{}", stamp)


def stripe_header(secret: str, stamp: int, body: bytes) -> str:
    """Stripe's documented scheme, computed here independently: hex HMAC-SHA256 with
    the endpoint secret of "<t>.<raw body>"."""
    v1 = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={v1},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"


def test_stripes_scheme_verifies_within_the_tolerance_only() -> None:
    cfg, keys = keys_for("stripe", STRIPE_SECRET)
    body = b'{"id": "evt_1", "type": "charge.succeeded"}'
    header = {"stripe-signature": stripe_header(STRIPE_SECRET, NOW, body)}
    assert verify(cfg, keys, header, body, NOW + 299)
    assert not verify(cfg, keys, header, body, NOW + 301)
    assert not verify(cfg, keys, header, body.replace(b"1", b"2"), NOW)
    wrong = {"stripe-signature": stripe_header("whsec_other_0123456789abcdef", NOW, body)}
    assert not verify(cfg, keys, wrong, body, NOW)


def test_a_missing_or_short_secret_is_a_problem_naming_the_field_not_the_value() -> None:
    settings = load_settings(webhooks={
        "a": {"scheme": "github", "secret_env": "A_SECRET", "type": "demo.ok"},
        "b": {"scheme": "github", "secret_env": "B_SECRET", "type": "demo.ok"}})
    _, problems = webhook_keys(settings, {"B_SECRET": "shortsecret"})
    assert [p.field for p in problems] == ["webhooks.a.secret_env", "webhooks.b.secret_env"]
    assert "shortsecret" not in " ".join(str(p) for p in problems)


@pytest.mark.parametrize("hook", [
    {"scheme": "github", "secret_env": "X"},
    {"scheme": "github", "secret_env": "X", "type": "a.b", "type_field": "action"},
    {"scheme": "nope", "secret_env": "X", "type": "a.b"},
])
def test_a_webhook_needs_one_way_to_its_type_and_a_known_scheme(hook: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(webhooks={"hook": hook})
    assert "webhooks.hook" in str(info.value)


def test_a_webhook_name_must_be_a_path_segment() -> None:
    with pytest.raises(ConfigError):
        load_settings(webhooks={"a/b": {"scheme": "github", "secret_env": "X", "type": "a.b"}})


def test_mapping_takes_type_payload_and_delivery_id() -> None:
    cfg, _ = keys_for("github", GITHUB_SECRET, type="github.{header:X-GitHub-Event}")
    headers = {"x-github-event": "push", "x-github-delivery": "d-1"}
    event = event_from(cfg, "gh", headers, b"{}", {"ref": "main"})
    assert event == {"type": "github.push", "source": "gh", "payload": {"ref": "main"},
                     "idempotency_key": "d-1"}
    stripe, _ = keys_for("stripe", STRIPE_SECRET, type=None, type_field="type",
                         type_prefix="stripe.", payload_field="data.object")
    doc = {"id": "evt_1", "type": "charge.succeeded", "data": {"object": {"amount": 5}}}
    assert event_from(stripe, "stripe", {}, b"x", doc) == {
        "type": "stripe.charge.succeeded", "source": "stripe", "payload": {"amount": 5},
        "idempotency_key": "evt_1"}


def test_without_a_delivery_id_the_bodys_hash_is_the_key() -> None:
    cfg, _ = keys_for("hmac-sha256", GITHUB_SECRET)
    event = event_from(cfg, "h", {}, b'{"a": 1}', {"a": 1})
    assert event["idempotency_key"] == "sha256:" + hashlib.sha256(b'{"a": 1}').hexdigest()


@pytest.mark.parametrize(("doc", "field"), [([1], "<document>"), ({"x": 1}, "type")])
def test_a_body_that_cannot_map_names_the_field(doc: object, field: str) -> None:
    cfg, _ = keys_for("github", GITHUB_SECRET, type="github.{action}")
    with pytest.raises(MappingProblem) as info:
        event_from(cfg, "gh", {}, b"", doc)
    assert info.value.problem["field"] == field
