"""The routes operators and their tools call: ``GET /healthz`` (process alive),
``GET /readyz`` (broker reachable -> 200, else 503), both without auth, and
``GET /metrics`` (Prometheus, any valid token; not in the API's schema).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry

from pipeline.errors import BrokerUnavailable
from pipeline.http.deps import AnyCaller, RuntimeDep
from pipeline.observe import exporter

__all__ = ["add_ops_routes"]


async def registry_of(request: Request) -> CollectorRegistry:
    """The metrics registry :func:`pipeline.http.api.create_api` built for the app."""
    registry: CollectorRegistry = request.app.state.metrics
    return registry


Registry = Annotated[CollectorRegistry, Depends(registry_of)]


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(runtime: RuntimeDep) -> Response:
    try:
        await run_in_threadpool(runtime.publisher.ping)
    except BrokerUnavailable as exc:
        return JSONResponse({"status": "unavailable", "error": str(exc)}, 503)
    return JSONResponse({"status": "ready"})


async def metrics(by: AnyCaller, registry: Registry) -> Response:
    """Prometheus metrics (see docs/observability.md); any valid token."""
    body = await run_in_threadpool(exporter.scrape, registry)
    return Response(body, media_type=exporter.CONTENT_TYPE)


def add_ops_routes(router: APIRouter) -> None:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``router`` (an app's own)."""
    router.get("/healthz")(healthz)
    router.get("/readyz", responses={503: {"description": "broker unreachable"}})(readyz)
    router.get("/metrics", include_in_schema=False)(metrics)
