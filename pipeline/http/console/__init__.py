"""The DLQ console: HTML pages of the API server (``/console``) for what ``pipeline dlq``
does, behind a login with an API token.

=============================  ================================================
``GET /console``                fingerprint groups: count, first/last seen, tiers,
                                handler, exception, a sparkline of the last 24 h
``GET /console/records``        a group's records, filtered (tier, type, reason,
                                handler, exception, fingerprint, since, until)
``GET /console/records/{id}``   one record whole: event, traceback, attempts, times
``POST /console/replay``        ``step=dry-run``: what would be replayed, then a
                                confirmation form; ``step=confirm``: replay
``POST /console/purge``         ``step=preview``: the count, then a confirmation
                                form naming it; ``step=confirm``: purge
``GET|POST /console/login``     the token in, a session cookie out
``POST /console/logout``        the cookie cleared
=============================  ================================================

A page asked for without a session redirects to the login page; a form posted
without one (replay, purge, logout) is 401, without the scope or CSRF token 403.

Seeing needs a token with ``dlq:read``, acting ``dlq:write``; replays (dry runs too)
and purges go through :class:`pipeline.dlq.replay.Replayer`, the code path of ``POST
/dlq/replay`` and ``/dlq/purge``, so each writes the same audit entry, naming the
token (``token:<name>``). Filters are :class:`pipeline.http.dlq.Selection`, as over
HTTP. Sessions and CSRF: :mod:`pipeline.http.console.session`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from pipeline.core.redact import failure_shown, redact
from pipeline.core.retry import Reason
from pipeline.core.tokens import find_credential
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from pipeline.http.console.render import page, parse_form, sparkline
from pipeline.http.console.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    Session,
    csrf_ok,
    new_key,
    new_session,
    read_session,
    sign_session,
)
from pipeline.http.dlq import ReplayRequest, Selection

if TYPE_CHECKING:
    from pipeline.worker.runtime import Runtime

__all__ = ["add_console_routes"]

PAGE_RECORDS = 100  # records listed on a page of a group (the count covers them all)
PREVIEW_RECORDS = 20  # records a dry run or purge confirmation lists by name
DRY_RUN_CHECKS = 5_000  # oldest records a dry run checks against the handlers (page time)
FILTER_FIELDS = ("tier", "type", "reason", "exception", "handler", "fingerprint", "since",
                 "until")
LOGIN_PATH = "/console/login"


def _filters(source: Any) -> dict[str, str]:
    return {k: str(source[k]).strip() for k in FILTER_FIELDS if str(source.get(k) or "").strip()}


def add_console_routes(api: FastAPI, runtime: Runtime) -> None:
    key = new_key()  # per process: a restart of the API ends every session
    tiers = list(runtime.settings.tiers)
    reasons = [r.value for r in Reason]

    def cookie(response: Response, request: Request, name: str, value: str,
               max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/console", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    def session_for(request: Request, scope: str) -> Session | Response:
        """The request's session holding ``scope``; else a redirect to the login page
        (no or a bad cookie, or a token since removed) or a 403 page."""
        session = read_session(key, request.cookies.get(SESSION_COOKIE))
        known = {c.name for c in request.app.state.credentials}
        if session is None or session.name not in known:
            return RedirectResponse(LOGIN_PATH, 303)
        if scope not in session.scopes:
            return page("message.html", 403, session=session, title="Not allowed",
                        message=f"Token {session.name!r} lacks the {scope!r} scope.")
        return session

    async def posted(request: Request,
                     scope: str) -> tuple[Session, dict[str, str]] | Response:
        """The session (holding ``scope``) and the form of a state-changing POST whose
        CSRF token matches; else the page that refuses it: 401 without a session (not
        a redirect: a state-changing route never answers anything but 401/403 to a
        caller without the right credentials), 403 without the scope or the token."""
        session = session_for(request, scope)
        if isinstance(session, RedirectResponse):
            return page("message.html", 401, session=None, title="Log in first",
                        message="No session, or it has ended: log in again at "
                                f"{LOGIN_PATH}.")
        if isinstance(session, Response):
            return session
        try:
            form = parse_form(await request.body())
        except ValueError as exc:
            return page("message.html", 413, session=session, title="Refused",
                        message=str(exc))
        if not csrf_ok(session.csrf, form.get("csrf")):
            return page("message.html", 403, session=session, title="Refused",
                        message="Missing or wrong CSRF token: reload the page and try again.")
        return session, form

    def selection(session: Session, fields: dict[str, str], model: type[Selection],
                  **extra: Any) -> Selection | Response:
        try:
            sel = model(**fields, **extra)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            return page("message.html", 422, session=session, title="Invalid filter",
                        message=problems)
        if sel.unselective:
            return page("message.html", 422, session=session, title="Refused",
                        message="Name a fingerprint or a filter: an action never takes "
                                "the whole DLQ from the console.")
        return sel

    def matching(flt: RecordFilter, keep: int) -> tuple[int, list[DeadLetterRecord]]:
        return runtime.dlq.query.select(flt, keep)

    @api.get(LOGIN_PATH, include_in_schema=False)
    async def login_form(request: Request) -> Response:
        nonce = new_key().hex()
        response = page("login.html", csrf=nonce, error=None)
        cookie(response, request, LOGIN_COOKIE, nonce, SESSION_MAX_AGE_S)
        return response

    @api.post(LOGIN_PATH, include_in_schema=False)
    async def login(request: Request) -> Response:
        try:
            form = parse_form(await request.body())
        except ValueError:
            form = {}
        if not csrf_ok(request.cookies.get(LOGIN_COOKIE), form.get("csrf")):
            return page("message.html", 403, session=None, title="Refused",
                        message="Missing or wrong CSRF token: reload the login page.")
        found = find_credential(request.app.state.credentials, form.get("token", ""))
        if found is None:
            return page("login.html", 401, csrf=request.cookies.get(LOGIN_COOKIE),
                        error="Wrong token.")
        if "dlq:read" not in found.scopes:
            return page("login.html", 403, csrf=request.cookies.get(LOGIN_COOKIE),
                        error=f"Token {found.name!r} lacks the 'dlq:read' scope.")
        response = RedirectResponse("/console", 303)
        signed = sign_session(key, new_session(found.name, found.scopes))
        cookie(response, request, SESSION_COOKIE, signed, SESSION_MAX_AGE_S)
        response.delete_cookie(LOGIN_COOKIE, path="/console")
        return response

    @api.post("/console/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        got = await posted(request, "dlq:read")
        if isinstance(got, Response):
            return got
        response = RedirectResponse(LOGIN_PATH, 303)
        response.delete_cookie(SESSION_COOKIE, path="/console")
        return response

    @api.get("/console", include_in_schema=False)
    async def groups(request: Request) -> Response:
        session = session_for(request, "dlq:read")
        if isinstance(session, Response):
            return session
        stats = await run_in_threadpool(runtime.dlq.query.groups)
        return page("groups.html", session=session, groups=stats, sparkline=sparkline,
                    total=sum(s.count for s in stats))

    @api.get("/console/records", include_in_schema=False)
    async def records(request: Request) -> Response:
        session = session_for(request, "dlq:read")
        if isinstance(session, Response):
            return session
        fields = _filters(request.query_params)
        try:
            flt = Selection(**fields).to_filter()
        except ValidationError as exc:
            return page("message.html", 422, session=session, title="Invalid filter",
                        message="; ".join(str(e["msg"]) for e in exc.errors()))
        count, shown = await run_in_threadpool(matching, flt, PAGE_RECORDS)
        return page("records.html", session=session, filters=fields, count=count,
                    records=shown, tiers=tiers, reasons=reasons,
                    fingerprint_of=record_fingerprint)

    @api.get("/console/records/{record_id}", include_in_schema=False)
    async def record(request: Request, record_id: str) -> Response:
        session = session_for(request, "dlq:read")
        if isinstance(session, Response):
            return session
        count, found = await run_in_threadpool(runtime.dlq.query.find, record_id, 1)
        if count != 1 or not found:
            return page("message.html", 404, session=session, title="No such record",
                        message=f"{count} records match {record_id[:80]!r}.")
        paths = runtime.settings.redact_paths
        shown = found[0].model_copy(update={"event": redact(found[0].event, paths),
                                            **failure_shown(found[0], paths)})
        return page("record.html", session=session, r=shown,
                    fingerprint=record_fingerprint(found[0]))

    @api.post("/console/replay", include_in_schema=False)
    async def replay(request: Request) -> Response:
        got = await posted(request, "dlq:write")
        if isinstance(got, Response):
            return got
        session, form = got
        fields = _filters(form)
        options = {k: form[k] for k in ("to_tier", "rate") if form.get(k, "").strip()}
        confirmed = form.get("step") == "confirm"
        sel = selection(session, fields, ReplayRequest, **options, dry_run=not confirmed)
        if isinstance(sel, Response):
            return sel
        assert isinstance(sel, ReplayRequest)
        if sel.to_tier is not None and sel.to_tier not in runtime.settings.tiers:
            return page("message.html", 422, session=session, title="Invalid option",
                        message=f"to-tier {sel.to_tier!r} is not a tier.")
        summary = await run_in_threadpool(
            lambda: Replayer(runtime).replay(sel.to_filter(), by=session.caller,
                                             to_tier=sel.to_tier, rate_per_s=sel.rate,
                                             dry_run=sel.dry_run,
                                             check_limit=DRY_RUN_CHECKS))
        preview: list[DeadLetterRecord] = []
        if sel.dry_run:
            _, preview = await run_in_threadpool(matching, sel.to_filter(), PREVIEW_RECORDS)
        return page("replay.html", session=session, filters=fields, options=options,
                    summary=summary, preview=preview, tiers=tiers)

    @api.post("/console/purge", include_in_schema=False)
    async def purge(request: Request) -> Response:
        got = await posted(request, "dlq:write")
        if isinstance(got, Response):
            return got
        session, form = got
        fields = _filters(form)
        sel = selection(session, fields, Selection)
        if isinstance(sel, Response):
            return sel
        if form.get("step") != "confirm":
            count, preview = await run_in_threadpool(matching, sel.to_filter(),
                                                     PREVIEW_RECORDS)
            return page("purge.html", session=session, filters=fields, count=count,
                        preview=preview, purged=None)
        purged = await run_in_threadpool(
            lambda: Replayer(runtime).purge(sel.to_filter(), by=session.caller))
        return page("purge.html", session=session, filters=fields, count=purged,
                    preview=[], purged=purged)
