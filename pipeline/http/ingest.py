"""Events in over HTTP: ``POST /events`` and ``POST /events/batch`` (an ``ingest`` token).

Also what the webhook route (:mod:`pipeline.http.webhooks`) shares with them: a body
read under a cap (:func:`body_of`), the publish (:func:`publish`, 503 on a broker
outage) and the answer to one event's result (:func:`single_response`). Statuses and
limits: :mod:`pipeline.http.api`.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from pipeline.config.model import Settings
from pipeline.core.admission import TIER_FULL
from pipeline.core.events import EVENT_ENVELOPE_MAX_BYTES, Event, over_payload_cap
from pipeline.core.tokens import Credential
from pipeline.errors import BrokerUnavailable
from pipeline.http.deps import IngestCaller, Problem, RuntimeDep
from pipeline.producer.enqueue import IN_FLIGHT
from pipeline.producer.results import FORBIDDEN_SOURCE, PublishResult
from pipeline.worker.runtime import Runtime

__all__ = ["EVENT_CAP_WHAT", "add_ingest_routes", "body_of", "event_cap", "not_json",
           "publish", "single_response"]

log = logging.getLogger(__name__)

RETRY_AFTER_FULL_S = 5  # Retry-After sent with 429 when a tier is full
RETRY_AFTER_DOWN_S = 2  # Retry-After sent with 503 when the broker is down
RETRY_AFTER_IN_FLIGHT_S = 2  # Retry-After sent with 409 while another publish is unconfirmed
JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson")
EVENT_CAP_WHAT = "per-event cap (max_payload_bytes and the envelope)"  # named in a 413


def _event_schema() -> dict[str, Any]:
    return Event.model_json_schema(ref_template="#/components/schemas/{model}")


SINGLE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _event_schema()}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "array", "items": _event_schema()}},
    "application/x-ndjson": {"schema": {"type": "string"}}}}}


def event_cap(settings: Settings) -> int:
    """One event's body: its payload cap plus what the rest of an event can take."""
    return min(settings.api_max_body_bytes,
               settings.max_payload_bytes + EVENT_ENVELOPE_MAX_BYTES)


def not_json(message: str) -> Problem:
    """The 422 of a body that is not the JSON document a route takes."""
    return Problem(422, {"errors": [{"field": "<document>", "value": None,
                                     "message": message}]})


async def body_of(request: Request, allowed: tuple[str, ...] | None,
                  limit: int, what: str) -> tuple[bytes, str]:
    """The body and its content type: 415 for a type not ``allowed`` (None: any),
    413 for a body, declared or read, over ``limit`` (the ``what``)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if allowed is not None and kind not in allowed:
        raise Problem(415, {"error": f"content-type {kind or '(none)'!r} not accepted; "
                                     f"use {' or '.join(allowed)}"})
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, {"error": f"body of {declared} bytes over the {limit}-byte "
                                     f"{what}"})
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, {"error": f"body over the {limit}-byte {what}"})
        chunks.append(chunk)
    return b"".join(chunks), kind


async def publish(runtime: Runtime, items: list[Any],
                  by: Credential | None) -> list[PublishResult]:
    """One result per item; a broker outage is 503 with what was accepted before it."""
    allowed = by.may_publish if by is not None and by.sources else None
    try:
        return await run_in_threadpool(
            lambda: runtime.publisher.publish_many(items, may_publish=allowed))
    except BrokerUnavailable as exc:
        log.error("ingest refused: %s", exc)
        raise Problem(503, {"error": "broker unavailable; nothing was accepted from the "
                                     "failed chunk", "accepted": [
                                         r.as_dict() for r in getattr(exc, "results", [])]},
                      {"Retry-After": str(RETRY_AFTER_DOWN_S)}) from None


def single_response(result: PublishResult) -> Response:
    """The answer to one event: its result, with the status its outcome calls for."""
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
        raise not_json(f"not JSON: {exc}") from None
    if not isinstance(items, list):
        raise not_json("a batch must be a JSON array of events")
    return items


async def post_event(request: Request, by: IngestCaller, runtime: RuntimeDep) -> Response:
    raw, _ = await body_of(request, JSON_TYPES, event_cap(runtime.settings), EVENT_CAP_WHAT)
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise not_json(f"not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise not_json("an event must be a JSON object")
    (result,) = await publish(runtime, [item], by)
    return single_response(result)


async def post_batch(request: Request, by: IngestCaller, runtime: RuntimeDep) -> Response:
    settings = runtime.settings
    raw, kind = await body_of(request, JSON_TYPES + NDJSON_TYPES,
                              settings.api_max_body_bytes, "limit (api_max_body_bytes)")
    items = _batch_items(raw, kind)
    if len(items) > settings.api_max_batch:
        raise Problem(413, {"error": f"{len(items)} events over the batch limit of "
                                     f"{settings.api_max_batch}"})
    results = await publish(runtime, items, by)
    body = {"results": [r.as_dict() for r in results],
            "accepted": sum(r.outcome == "accepted" for r in results),
            "duplicate": sum(r.outcome == "duplicate" for r in results),
            "rejected": sum(r.outcome == "rejected" for r in results)}
    status = 207 if body["rejected"] else 202
    return JSONResponse(body, status)


def add_ingest_routes(router: APIRouter) -> None:
    """``POST /events`` and ``POST /events/batch`` on ``router`` (an app's own)."""
    router.post("/events", status_code=202, openapi_extra=SINGLE_BODY,
                responses={200: {"description": "duplicate"}, 401: {}, 403: {}, 413: {},
                           415: {}, 422: {}, 409: {"description": "in flight"}, 429: {},
                           503: {}})(post_event)
    router.post("/events/batch", status_code=202, openapi_extra=BATCH_BODY,
                responses={207: {"description": "some items rejected"}, 401: {}, 403: {},
                           413: {}, 415: {}, 422: {}, 503: {}})(post_batch)
