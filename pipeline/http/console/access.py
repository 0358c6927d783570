"""Who may see and act in the console, as FastAPI dependencies of its routes.

A page asked for without a session redirects to the login page; a form posted
without one (replay, purge, logout) is 401, without the scope or CSRF token 403.
The dependencies read the session key (``app.state.console_key``, one per app: a
restart of the API ends every session) and the API's credentials (a session of a
token since removed is no session) from ``request.app.state``. A refusal is a page
raised as :class:`Refused`, which the app answers with :func:`refused_response`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from pipeline.http.console.render import page, parse_form
from pipeline.http.console.session import SESSION_COOKIE, Session, csrf_ok, read_session
from pipeline.http.dlq import Selection

__all__ = ["LOGIN_PATH", "Posted", "ReadForm", "Reader", "Refused", "WriteForm", "console_key",
           "refused_response", "selection", "set_cookie"]

LOGIN_PATH = "/console/login"


class Refused(Exception):
    """The page that answers a console request instead of its route."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def refused_response(request: Request, exc: Refused) -> Response:
    """The app's exception handler for :class:`Refused`."""
    return exc.response


@dataclass(frozen=True)
class Posted:
    """A state-changing form: the session that posted it and its fields."""

    session: Session
    form: dict[str, str]


def console_key(request: Request) -> bytes:
    """The key that signs the app's console sessions."""
    key: bytes = request.app.state.console_key
    return key


def set_cookie(response: Response, request: Request, name: str, value: str,
               max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def _logged_in(request: Request) -> Session | None:
    """The request's session; None without one, with a bad cookie or for a token since
    removed."""
    session = read_session(console_key(request), request.cookies.get(SESSION_COOKIE))
    known = {c.name for c in request.app.state.credentials}
    return None if session is None or session.name not in known else session


def _holding(session: Session, scope: str) -> Session:
    """``session`` if it holds ``scope``; else a 403 page."""
    if scope not in session.scopes:
        raise Refused(page("message.html", 403, session=session, title="Not allowed",
                           message=f"Token {session.name!r} lacks the {scope!r} scope."))
    return session


def viewer(scope: str) -> Callable[[Request], Awaitable[Session]]:
    """A dependency: the request's session, holding ``scope``; else a redirect to the
    login page or a 403 page."""

    async def dependency(request: Request) -> Session:
        session = _logged_in(request)
        if session is None:
            raise Refused(RedirectResponse(LOGIN_PATH, 303))
        return _holding(session, scope)

    return dependency


def poster(scope: str) -> Callable[[Request], Awaitable[Posted]]:
    """A dependency: the session (holding ``scope``) and the form of a state-changing
    POST whose CSRF token matches; else the page that refuses it: 401 without a
    session (not a redirect: a state-changing route never answers anything but
    401/403 to a caller without the right credentials), 403 without the scope or the
    token."""

    async def dependency(request: Request) -> Posted:
        session = _logged_in(request)
        if session is None:
            raise Refused(page("message.html", 401, session=None, title="Log in first",
                               message="No session, or it has ended: log in again at "
                                       f"{LOGIN_PATH}."))
        _holding(session, scope)
        try:
            form = parse_form(await request.body())
        except ValueError as exc:
            raise Refused(page("message.html", 413, session=session, title="Refused",
                               message=str(exc))) from None
        if not csrf_ok(session.csrf, form.get("csrf")):
            raise Refused(page("message.html", 403, session=session, title="Refused",
                               message="Missing or wrong CSRF token: reload the page and "
                                       "try again."))
        return Posted(session, form)

    return dependency


Reader = Annotated[Session, Depends(viewer("dlq:read"))]
ReadForm = Annotated[Posted, Depends(poster("dlq:read"))]
WriteForm = Annotated[Posted, Depends(poster("dlq:write"))]


def selection(session: Session, fields: dict[str, str], model: type[Selection],
              **extra: Any) -> Selection:
    """The records ``fields`` select for an action; a 422 page for an invalid filter
    or one that selects the whole DLQ."""
    try:
        sel = model(**fields, **extra)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        raise Refused(page("message.html", 422, session=session, title="Invalid filter",
                           message=problems)) from None
    if sel.unselective:
        raise Refused(page("message.html", 422, session=session, title="Refused",
                           message="Name a fingerprint or a filter: an action never takes "
                                   "the whole DLQ from the console."))
    return sel
