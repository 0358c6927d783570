"""``POST /webhooks/{name}``: a signed delivery of ``[webhooks.NAME]``, published as
``POST /events`` publishes (:mod:`pipeline.http.ingest`).

No bearer token: the signature is the credential (:mod:`pipeline.core.webhooks`),
checked against the keys :func:`pipeline.http.api.create_api` read from each
webhook's ``secret_env`` (``app.state.webhook_keys``). Unknown name 404, body over
the per-event cap 413, any failed check 401 saying only that.
"""

from __future__ import annotations

import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from pipeline.core import webhooks
from pipeline.errors import clip
from pipeline.http.deps import Problem, RuntimeDep
from pipeline.http.ingest import (
    EVENT_CAP_WHAT,
    body_of,
    event_cap,
    not_json,
    publish,
    single_response,
)

__all__ = ["add_webhook_routes"]

WEBHOOK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}}}}}


async def webhook_keys_of(request: Request) -> dict[str, tuple[bytes, ...]]:
    """Each webhook's HMAC keys, by name."""
    keys: dict[str, tuple[bytes, ...]] = request.app.state.webhook_keys
    return keys


WebhookKeys = Annotated[dict[str, tuple[bytes, ...]], Depends(webhook_keys_of)]


async def post_webhook(request: Request, name: str, runtime: RuntimeDep,
                       keys: WebhookKeys) -> Response:
    """A delivery of ``[webhooks.NAME]``; its signature is the credential."""
    cfg = runtime.settings.webhooks.get(name)
    if cfg is None:
        raise Problem(404, {"error": f"no webhook named {clip(name, 80)!r}"})
    raw, _ = await body_of(request, None, event_cap(runtime.settings), EVENT_CAP_WHAT)
    if not webhooks.verify(cfg, keys[name], request.headers, raw, time.time()):
        raise Problem(401, {"error": "webhook signature verification failed"})
    try:
        item = webhooks.event_from(cfg, name, request.headers, raw, orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise not_json(f"not JSON: {exc}") from None
    except webhooks.MappingProblem as exc:
        raise Problem(422, {"errors": [exc.problem]}) from None
    (result,) = await publish(runtime, [item], None)
    return single_response(result)


def add_webhook_routes(router: APIRouter) -> None:
    """``POST /webhooks/{name}`` on ``router`` (an app's own)."""
    router.post("/webhooks/{name}", status_code=202, openapi_extra=WEBHOOK_BODY,
                responses={200: {"description": "duplicate delivery"}, 401: {}, 404: {},
                           413: {}, 422: {}, 409: {"description": "in flight"}, 429: {},
                           503: {}})(post_webhook)
