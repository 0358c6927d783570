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

Here the app is built (:func:`create_api`). Each route is a module-level function in
the module of its wing (:mod:`pipeline.http.ingest` for ``/events``,
:mod:`pipeline.http.webhooks`, :mod:`pipeline.http.ops` for ``/healthz``, ``/readyz``
and ``/metrics``, :mod:`pipeline.http.dlq`, :mod:`pipeline.http.console`), and that
module's ``add_*_routes`` registers them on the app's own
``APIRouter``: each app gets route objects of its own and a flat ``app.routes``, which
``include_router`` of module-wide routers no longer gives (FastAPI 0.137 keeps included
routers as a tree). What the routes share (the runtime, the credentials, the webhook
keys...) is on ``app.state``, read through the dependencies of :mod:`pipeline.http.deps`.

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

from collections.abc import Mapping, Sequence

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from pipeline.core import webhooks
from pipeline.core.tokens import DEFAULT_TOKEN_NAME, Credential, token_problem
from pipeline.errors import ConfigError, FieldProblem
from pipeline.http.console import add_console_routes
from pipeline.http.console.access import Refused, refused_response
from pipeline.http.console.session import new_key
from pipeline.http.deps import Problem, problem_response
from pipeline.http.dlq import add_dlq_routes
from pipeline.http.ingest import add_ingest_routes
from pipeline.http.ops import add_ops_routes
from pipeline.http.webhooks import add_webhook_routes
from pipeline.observe import exporter
from pipeline.worker.runtime import Runtime

__all__ = ["create_api"]

# In this order: the served schema lists the paths in the order they were added.
ADD_ROUTES = (add_ingest_routes, add_webhook_routes, add_ops_routes, add_dlq_routes,
              add_console_routes)


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
    hook_keys, hook_problems = webhooks.webhook_keys(runtime.settings, environ)
    if hook_problems:
        raise ConfigError(hook_problems)
    api = FastAPIOffline(title="pipeline ingest", version="1",
                         description="Events in; tiers, retries and a DLQ behind.",
                         # no spec sent to the online validator (a badge it would fetch)
                         swagger_ui_parameters={"validatorUrl": None},
                         exception_handlers={Problem: problem_response,
                                             Refused: refused_response})
    api.state.credentials = _checked(credentials, token, tokens)
    api.state.runtime = runtime
    api.state.webhook_keys = hook_keys
    api.state.metrics = exporter.build_registry(runtime)
    api.state.console_key = new_key()  # per app: a restart of the API ends every session
    for add_routes in ADD_ROUTES:
        add_routes(api.router)
    return api
