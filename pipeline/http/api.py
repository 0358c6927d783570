"""HTTP ingest: ``pipeline serve``.

=====================  ====================================================
``POST /events``        one JSON event -> 202 (accepted) / 200 (duplicate)
``POST /events/batch``  JSON array or NDJSON -> 202 (all taken) / 207 (mixed)
``GET /healthz``        process alive (no auth)
``GET /readyz``         broker reachable -> 200, else 503 (no auth)
``GET /metrics``        Prometheus metrics (any valid token)
``GET /docs``, ``/redoc``  the API's pages, every asset served from the package (no auth)
``/dlq...``             DLQ operations (:mod:`pipeline.http.dlq`)
``/console...``         the DLQ console, login with a token (:mod:`pipeline.http.console`)
``POST /webhooks/{name}``  a signed delivery of ``[webhooks.NAME]`` -> as ``/events``
=====================  ====================================================

Webhooks carry no bearer token: the signature is the credential
(:mod:`pipeline.core.webhooks`). Unknown name 404, body over the per-event cap 413,
any failed check (signature, secret, stale timestamp, missing header) 401 saying
only that; a verified delivery is published as ``POST /events`` publishes.

Bearer-token auth (:mod:`pipeline.core.tokens`) on every route that reads or writes
events or the DLQ: a request without a valid token is 401, whatever the
configuration (an API without tokens lets nobody in); a valid token without the
route's scope (``ingest``, ``dlq:read``, ``dlq:write``) is 403, and so is an event
for a source its ``ingest`` token is not limited to. Limits: body size (413),
batch size (413), an event over its cap (413: the payload's ``max_payload_bytes``,
or a body over that plus the envelope), content type (415). No answer echoes more
than ~200 characters of an offending value. Invalid events get 422 naming every
offending field; a full tier 429 with ``Retry-After``; an event whose key another
publish holds unconfirmed (RabbitMQ) 409 with ``Retry-After``; a broker outage
503 — and nothing is reported accepted that was not enqueued. No input produces
another 5xx.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts, styles and icon from
``/static-offline-docs``, files the pinned ``fastapi-offline`` package ships: FastAPI's
own pages fetch them from a CDN and stay blank on a machine without internet.
(ReDoc's script still asks for Redocly's logo online; it hides the image offline.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline

from pipeline.core import webhooks
from pipeline.core.admission import TIER_FULL
from pipeline.core.events import EVENT_ENVELOPE_MAX_BYTES, Event, over_payload_cap
from pipeline.core.tokens import DEFAULT_TOKEN_NAME, Credential, find_credential, token_problem
from pipeline.errors import BrokerUnavailable, ConfigError, FieldProblem, clip
from pipeline.http.console import add_console_routes
from pipeline.http.dlq import add_dlq_routes
from pipeline.observe import exporter
from pipeline.producer.enqueue import IN_FLIGHT
from pipeline.producer.publisher import FORBIDDEN_SOURCE, PublishResult
from pipeline.worker.runtime import Runtime

__all__ = ["create_api"]

log = logging.getLogger(__name__)

RETRY_AFTER_FULL_S = 5  # Retry-After sent with 429 when a tier is full
RETRY_AFTER_DOWN_S = 2  # Retry-After sent with 503 when the broker is down
RETRY_AFTER_IN_FLIGHT_S = 2  # Retry-After sent with 409 while another publish is unconfirmed
JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")


# Module level: FastAPI resolves the (string) annotations against module globals.
_bearer = HTTPBearer(auto_error=False, description="PIPELINE_API_TOKEN or a named token")
BearerCreds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class _Problem(Exception):
    """An HTTP error with a JSON body, raised inside a handler."""

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


def _event_schema() -> dict[str, Any]:
    return Event.model_json_schema(ref_template="#/components/schemas/{model}")


def require(scope: str | None) -> Callable[..., Credential]:
    """A dependency: the caller's credential, which must hold ``scope`` (None: any
    valid token). No or a wrong token -> 401; a token without the scope -> 403."""

    def caller(request: Request, creds: BearerCreds) -> Credential:
        offered = creds.credentials if creds is not None else ""
        found = find_credential(request.app.state.credentials, offered)
        if found is None:
            raise _Problem(401, {"error": "missing or wrong bearer token"},
                           {"WWW-Authenticate": "Bearer"})
        if scope is not None and scope not in found.scopes:
            raise _Problem(403, {"error": f"token {found.name!r} lacks the {scope!r} scope"})
        return found

    return caller


IngestCaller = Annotated[Credential, Depends(require("ingest"))]
AnyCaller = Annotated[Credential, Depends(require(None))]


def _checked(credentials: Sequence[Credential] | None, token: str | None,
             tokens: Mapping[str, str] | None) -> list[Credential]:
    """Every credential the API accepts; a token that could not be one is refused here
    too, so no caller can build an API that an empty token opens."""
    found = list(credentials or [])
    found += [Credential(name, secret) for name, secret in (tokens or {}).items()]
    if token is not None:
        found.append(Credential(DEFAULT_TOKEN_NAME, token))
    problems = [FieldProblem(f"api_tokens.{c.name}", None, why) for c in found
                if (why := token_problem(c.secret)) is not None]
    if problems:
        raise ConfigError(problems)
    return found


def create_api(runtime: Runtime, *, credentials: Sequence[Credential] | None = None,
               token: str | None = None, tokens: Mapping[str, str] | None = None,
               environ: Mapping[str, str] | None = None) -> FastAPI:
    """The ASGI app. ``credentials`` (:func:`pipeline.core.tokens.credentials`), or for
    short ``token`` (named "default") and named ``tokens``, each with every scope.
    None at all: every route that needs a token answers 401. Webhook secrets are
    read from ``environ`` (default ``os.environ``); a missing one is a ConfigError."""
    settings = runtime.settings
    hook_keys, hook_problems = webhooks.webhook_keys(settings, environ)
    if hook_problems:
        raise ConfigError(hook_problems)
    api = FastAPIOffline(title="pipeline ingest", version="1",
                         description="Events in; tiers, retries and a DLQ behind.",
                         # no spec sent to the online validator (a badge it would fetch)
                         swagger_ui_parameters={"validatorUrl": None})
    api.state.credentials = _checked(credentials, token, tokens)

    @api.exception_handler(_Problem)
    async def _problem(request: Request, exc: _Problem) -> JSONResponse:
        return JSONResponse(exc.body, exc.status, headers=exc.headers)

    # One event's body: its payload cap plus what the rest of an event can take.
    event_cap = min(settings.api_max_body_bytes,
                    settings.max_payload_bytes + EVENT_ENVELOPE_MAX_BYTES)

    async def body_of(request: Request, allowed: tuple[str, ...] | None,
                      limit: int, what: str) -> tuple[bytes, str]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if allowed is not None and kind not in allowed:
            raise _Problem(415, {"error": f"content-type {kind or '(none)'!r} not accepted; "
                                          f"use {' or '.join(allowed)}"})
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _Problem(413, {"error": f"body of {declared} bytes over the {limit}-byte "
                                          f"{what}"})
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Problem(413, {"error": f"body over the {limit}-byte {what}"})
            chunks.append(chunk)
        return b"".join(chunks), kind

    async def publish(items: list[Any], by: Credential | None) -> list[PublishResult]:
        allowed = by.may_publish if by is not None and by.sources else None
        try:
            return await run_in_threadpool(
                lambda: runtime.publisher.publish_many(items, may_publish=allowed))
        except BrokerUnavailable as exc:
            log.error("ingest refused: %s", exc)
            raise _Problem(503, {"error": "broker unavailable; nothing was accepted from the "
                                          "failed chunk", "accepted": [
                                              r.as_dict() for r in getattr(exc, "results", [])]},
                           {"Retry-After": str(RETRY_AFTER_DOWN_S)}) from None

    single_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _event_schema()}}}}
    batch_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "array", "items": _event_schema()}},
        "application/x-ndjson": {"schema": {"type": "string"}}}}}

    @api.post("/events", status_code=202, openapi_extra=single_body,
              responses={200: {"description": "duplicate"}, 401: {}, 403: {}, 413: {},
                         415: {}, 422: {}, 409: {"description": "in flight"}, 429: {},
                         503: {}})
    async def post_event(request: Request, by: IngestCaller) -> Response:
        raw, _ = await body_of(request, JSON_TYPES, event_cap,
                               "per-event cap (max_payload_bytes and the envelope)")
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _Problem(422, {"errors": [{"field": "<document>", "value": None,
                                             "message": f"not JSON: {exc}"}]}) from None
        if not isinstance(item, dict):
            raise _Problem(422, {"errors": [{"field": "<document>", "value": None,
                                             "message": "an event must be a JSON object"}]})
        (result,) = await publish([item], by)
        return _single_response(result)

    @api.post("/events/batch", status_code=202, openapi_extra=batch_body,
              responses={207: {"description": "some items rejected"}, 401: {}, 403: {},
                         413: {}, 415: {}, 422: {}, 503: {}})
    async def post_batch(request: Request, by: IngestCaller) -> Response:
        raw, kind = await body_of(request, JSON_TYPES + NDJSON_TYPES,
                                  settings.api_max_body_bytes, "limit (api_max_body_bytes)")
        items = _batch_items(raw, kind)
        if len(items) > settings.api_max_batch:
            raise _Problem(413, {"error": f"{len(items)} events over the batch limit of "
                                          f"{settings.api_max_batch}"})
        results = await publish(items, by)
        body = {"results": [r.as_dict() for r in results],
                "accepted": sum(r.outcome == "accepted" for r in results),
                "duplicate": sum(r.outcome == "duplicate" for r in results),
                "rejected": sum(r.outcome == "rejected" for r in results)}
        status = 207 if body["rejected"] else 202
        return JSONResponse(body, status)

    webhook_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}}}}}

    @api.post("/webhooks/{name}", status_code=202, openapi_extra=webhook_body,
              responses={200: {"description": "duplicate delivery"}, 401: {}, 404: {},
                         413: {}, 422: {}, 409: {"description": "in flight"}, 429: {},
                         503: {}})
    async def post_webhook(request: Request, name: str) -> Response:
        """A delivery of ``[webhooks.NAME]``; its signature is the credential."""
        cfg = settings.webhooks.get(name)
        if cfg is None:
            raise _Problem(404, {"error": f"no webhook named {clip(name, 80)!r}"})
        raw, _ = await body_of(request, None, event_cap,
                               "per-event cap (max_payload_bytes and the envelope)")
        if not webhooks.verify(cfg, hook_keys[name], request.headers, raw, time.time()):
            raise _Problem(401, {"error": "webhook signature verification failed"})
        try:
            item = webhooks.event_from(cfg, name, request.headers, raw, orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise _Problem(422, {"errors": [{"field": "<document>", "value": None,
                                             "message": f"not JSON: {exc}"}]}) from None
        except webhooks.MappingProblem as exc:
            raise _Problem(422, {"errors": [exc.problem]}) from None
        (result,) = await publish([item], None)
        return _single_response(result)

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", responses={503: {"description": "broker unreachable"}})
    async def readyz() -> Response:
        try:
            await run_in_threadpool(runtime.publisher.ping)
        except BrokerUnavailable as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, 503)
        return JSONResponse({"status": "ready"})

    registry = exporter.build_registry(runtime)

    @api.get("/metrics", include_in_schema=False)
    async def metrics(by: AnyCaller) -> Response:
        """Prometheus metrics (see docs/observability.md); any valid token."""
        body = await run_in_threadpool(exporter.scrape, registry)
        return Response(body, media_type=exporter.CONTENT_TYPE)

    add_dlq_routes(api, runtime, require)
    add_console_routes(api, runtime)
    return api


def _single_response(result: PublishResult) -> Response:
    if result.outcome == "accepted":
        return JSONResponse(result.as_dict(), 202)
    if result.outcome == "duplicate":
        return JSONResponse(result.as_dict(), 200)
    if result.reason == TIER_FULL:
        return JSONResponse(result.as_dict(), 429,
                            headers={"Retry-After": str(RETRY_AFTER_FULL_S)})
    if result.reason == FORBIDDEN_SOURCE:
        return JSONResponse(result.as_dict(), 403)
    if result.reason == IN_FLIGHT:
        return JSONResponse(result.as_dict(), 409,
                            headers={"Retry-After": str(RETRY_AFTER_IN_FLIGHT_S)})
    if over_payload_cap(result.errors):  # as a body over the per-event cap
        return JSONResponse(result.as_dict(), 413)
    return JSONResponse(result.as_dict(), 422)


def _batch_items(raw: bytes, kind: str) -> list[Any]:
    """Items of a batch body; an unparseable NDJSON line becomes an item that fails alone."""
    if kind in NDJSON_TYPES:
        return [line for line in raw.splitlines() if line.strip()]
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Problem(422, {"errors": [{"field": "<document>", "value": None,
                                         "message": f"not JSON: {exc}"}]}) from None
    if not isinstance(items, list):
        raise _Problem(422, {"errors": [{"field": "<document>", "value": None,
                                         "message": "a batch must be a JSON array of events"}]})
    return items

