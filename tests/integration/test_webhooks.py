"""POST /webhooks/{name}: the signature is the credential; verified deliveries publish."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest
import standardwebhooks
from fastapi.testclient import TestClient

from pipeline.errors import ConfigError
from pipeline.http.api import create_api
from pipeline.worker.runtime import Runtime
from tests.integration.test_api import make_runtime

TOKEN = "webhook-test-token-0123456789ab"
GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
STRIPE_SECRET = "whsec_test_0123456789abcdefghij"
STANDARD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
ENV = {"GH_SECRET": f"old-secret-0123456789abcdef,{GITHUB_SECRET}",
       "STRIPE_SECRET": STRIPE_SECRET, "STD_SECRET": STANDARD_SECRET}
WEBHOOKS = {
    "github": {"scheme": "github", "secret_env": "GH_SECRET",
               "type": "demo.{header:X-GitHub-Event}"},
    "stripe": {"scheme": "stripe", "secret_env": "STRIPE_SECRET", "type_field": "type",
               "type_prefix": "demo.", "payload_field": "data.object"},
    "std": {"scheme": "standard", "secret_env": "STD_SECRET", "type": "demo.ok"},
}
REFUSED = {"error": "webhook signature verification failed"}


@pytest.fixture(scope="module")
def rt(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    return make_runtime(redis_url, tmp_path_factory.mktemp("webhooks"), webhooks=WEBHOOKS)


@pytest.fixture(scope="module")
def client(rt: Runtime) -> Iterator[TestClient]:
    with TestClient(create_api(rt, token=TOKEN, environ=ENV)) as c:
        yield c


def github(body: bytes, delivery: str, secret: str = GITHUB_SECRET) -> dict[str, str]:
    mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={mac}", "X-GitHub-Event": "ok",
            "X-GitHub-Delivery": delivery, "Content-Type": "application/json"}


def test_githubs_documented_example_passes_verification(client: TestClient) -> None:
    ok = client.post("/webhooks/github", content=b"Hello, World!",
                     headers={"X-Hub-Signature-256": GITHUB_SIGNATURE})
    assert ok.status_code == 422  # verified; not a JSON object, so not an event
    assert ok.json()["errors"][0]["field"] == "<document>"
    bad = client.post("/webhooks/github", content=b"Hello, World?",
                      headers={"X-Hub-Signature-256": GITHUB_SIGNATURE})
    assert (bad.status_code, bad.json()) == (401, REFUSED)


def test_a_verified_delivery_is_accepted_once_by_its_delivery_id(client: TestClient) -> None:
    body = orjson.dumps({"ref": "main"})
    delivery = str(uuid.uuid4())
    first = client.post("/webhooks/github", content=body, headers=github(body, delivery))
    assert first.status_code == 202, first.text
    again = client.post("/webhooks/github", content=body, headers=github(body, delivery))
    assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")


def test_a_bearer_token_is_no_substitute_for_a_signature(client: TestClient) -> None:
    body = orjson.dumps({"ref": "main"})
    headers = {**github(body, "d-token", secret="not-the-secret-0123456789"),
               "Authorization": f"Bearer {TOKEN}"}
    response = client.post("/webhooks/github", content=body, headers=headers)
    assert (response.status_code, response.json()) == (401, REFUSED)


def test_standard_webhooks_reference_signer_is_accepted_and_stale_is_401(
        client: TestClient) -> None:
    body = b'{"kind": "ok"}'
    signer = standardwebhooks.Webhook(STANDARD_SECRET)

    def headers(at: float, msg_id: str) -> dict[str, str]:
        sig = signer.sign(msg_id, datetime.fromtimestamp(int(at), UTC), body.decode())
        return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)),
                "webhook-signature": sig}

    msg_id = f"msg_{uuid.uuid4().hex}"
    assert client.post("/webhooks/std", content=body,
                       headers=headers(time.time(), msg_id)).status_code == 202
    stale = client.post("/webhooks/std", content=body,
                        headers=headers(time.time() - 600, f"msg_{uuid.uuid4().hex}"))
    assert (stale.status_code, stale.json()) == (401, REFUSED)


def test_stripe_delivery_maps_type_and_payload_and_dedupes_by_event_id(
        client: TestClient) -> None:
    event_id = f"evt_{uuid.uuid4().hex}"
    body = orjson.dumps({"id": event_id, "type": "ok", "data": {"object": {"amount": 5}}})
    stamp = int(time.time())
    v1 = hmac.new(STRIPE_SECRET.encode(), f"{stamp}.".encode() + body,
                  hashlib.sha256).hexdigest()
    headers = {"Stripe-Signature": f"t={stamp},v1={v1}"}
    assert client.post("/webhooks/stripe", content=body, headers=headers).status_code == 202
    again = client.post("/webhooks/stripe", content=body, headers=headers)
    assert again.status_code == 200


def test_unknown_source_is_404_and_a_body_over_the_cap_is_413(client: TestClient) -> None:
    assert client.post("/webhooks/nope", content=b"{}").status_code == 404
    body = b'{"x": "' + b"a" * (70 * 1024) + b'"}'
    assert client.post("/webhooks/github", content=body,
                       headers=github(body, "big")).status_code == 413


def test_an_unmappable_verified_body_is_422_naming_the_field(client: TestClient) -> None:
    body = orjson.dumps({"type": "Not A Type!", "id": "evt_x", "data": {"object": {}}})
    stamp = int(time.time())
    v1 = hmac.new(STRIPE_SECRET.encode(), f"{stamp}.".encode() + body,
                  hashlib.sha256).hexdigest()
    response = client.post("/webhooks/stripe", content=body,
                           headers={"Stripe-Signature": f"t={stamp},v1={v1}"})
    assert response.status_code == 422
    assert "type" in {e["field"] for e in response.json()["errors"]}


def test_the_api_refuses_to_start_without_a_webhooks_secret(rt: Runtime) -> None:
    with pytest.raises(ConfigError) as info:
        create_api(rt, token=TOKEN, environ={"GH_SECRET": GITHUB_SECRET})
    assert "webhooks.stripe.secret_env" in str(info.value)
