"""What the API's routes share, as FastAPI dependencies, and the JSON error they raise.

:func:`pipeline.http.api.create_api` puts the process's objects on ``app.state``
(``runtime``, ``credentials``, ``webhook_keys``, ``metrics``, ``console_key``); the
routes reach them through dependencies that read ``request.app.state``, never through
closures, so each route is a plain module-level function.

:func:`require` is the bearer-token check of every route that reads or writes events
or the DLQ: no or a wrong token 401, a valid token without the route's scope 403.
:class:`Problem` is an HTTP error with a JSON body that a route or a dependency
raises; the app answers it with :func:`problem_response`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.core.tokens import Credential, find_credential
from pipeline.worker.runtime import Runtime

__all__ = ["AnyCaller", "BearerCreds", "DlqReader", "DlqWriter", "IngestCaller", "Problem",
           "RuntimeDep", "problem_response", "require", "runtime_of"]

# Module level: FastAPI resolves the (string) annotations against module globals.
_bearer = HTTPBearer(auto_error=False, description="PIPELINE_API_TOKEN or a named token")
BearerCreds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


class Problem(Exception):
    """An HTTP error with a JSON body, raised inside a handler."""

    def __init__(self, status: int, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.headers = status, body, headers or {}


async def problem_response(request: Request, exc: Problem) -> JSONResponse:
    """The app's exception handler for :class:`Problem`."""
    return JSONResponse(exc.body, exc.status, headers=exc.headers)


def require(scope: str | None) -> Callable[..., Credential]:
    """A dependency: the caller's credential, which must hold ``scope`` (None: any
    valid token). No or a wrong token -> 401; a token without the scope -> 403."""

    def caller(request: Request, creds: BearerCreds) -> Credential:
        offered = creds.credentials if creds is not None else ""
        found = find_credential(request.app.state.credentials, offered)
        if found is None:
            raise Problem(401, {"error": "missing or wrong bearer token"},
                          {"WWW-Authenticate": "Bearer"})
        if scope is not None and scope not in found.scopes:
            raise Problem(403, {"error": f"token {found.name!r} lacks the {scope!r} scope"})
        return found

    return caller


IngestCaller = Annotated[Credential, Depends(require("ingest"))]
AnyCaller = Annotated[Credential, Depends(require(None))]
DlqReader = Annotated[Credential, Depends(require("dlq:read"))]
DlqWriter = Annotated[Credential, Depends(require("dlq:write"))]


async def runtime_of(request: Request) -> Runtime:
    """The runtime the app serves: its settings, publisher and DLQ."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
