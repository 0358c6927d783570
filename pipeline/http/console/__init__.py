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
without one (replay, purge, logout) is 401, without the scope or CSRF token 403
(:mod:`pipeline.http.console.access`, the routes' dependencies).

Seeing needs a token with ``dlq:read``, acting ``dlq:write``; replays (dry runs too)
and purges go through :class:`pipeline.dlq.replay.Replayer`, the code path of ``POST
/dlq/replay`` and ``/dlq/purge``, so each writes the same audit entry, naming the
token (``token:<name>``). Filters are :class:`pipeline.http.dlq.Selection`, as over
HTTP. Sessions and CSRF: :mod:`pipeline.http.console.session`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from pipeline.core.redact import failure_shown, redact
from pipeline.core.retry import Reason
from pipeline.core.tokens import find_credential
from pipeline.dlq.record import DeadLetterRecord
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import record_fingerprint
from pipeline.http.console.access import (
    LOGIN_PATH,
    Reader,
    ReadForm,
    WriteForm,
    console_key,
    selection,
    set_cookie,
)
from pipeline.http.console.render import page, parse_form, sparkline
from pipeline.http.console.session import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    csrf_ok,
    new_key,
    new_session,
    sign_session,
)
from pipeline.http.deps import RuntimeDep
from pipeline.http.dlq import ReplayRequest, Selection

__all__ = ["add_console_routes"]

PAGE_RECORDS = 100  # records listed on a page of a group (the count covers them all)
PREVIEW_RECORDS = 20  # records a dry run or purge confirmation lists by name
DRY_RUN_CHECKS = 5_000  # oldest records a dry run checks against the handlers (page time)
FILTER_FIELDS = ("tier", "type", "reason", "exception", "handler", "fingerprint", "since",
                 "until")
REASONS = [r.value for r in Reason]


def _filters(source: Any) -> dict[str, str]:
    return {k: str(source[k]).strip() for k in FILTER_FIELDS if str(source.get(k) or "").strip()}


async def login_form(request: Request) -> Response:
    nonce = new_key().hex()
    response = page("login.html", csrf=nonce, error=None)
    set_cookie(response, request, LOGIN_COOKIE, nonce, SESSION_MAX_AGE_S)
    return response


async def login(request: Request, key: Annotated[bytes, Depends(console_key)]) -> Response:
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
    set_cookie(response, request, SESSION_COOKIE, signed, SESSION_MAX_AGE_S)
    response.delete_cookie(LOGIN_COOKIE, path="/console")
    return response


async def logout(posted: ReadForm) -> Response:
    response = RedirectResponse(LOGIN_PATH, 303)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


async def groups(session: Reader, runtime: RuntimeDep) -> Response:
    stats = await run_in_threadpool(runtime.dlq.query.groups)
    return page("groups.html", session=session, groups=stats, sparkline=sparkline,
                total=sum(s.count for s in stats))


async def records(request: Request, session: Reader, runtime: RuntimeDep) -> Response:
    fields = _filters(request.query_params)
    try:
        flt = Selection(**fields).to_filter()
    except ValidationError as exc:
        return page("message.html", 422, session=session, title="Invalid filter",
                    message="; ".join(str(e["msg"]) for e in exc.errors()))
    count, shown = await run_in_threadpool(runtime.dlq.query.select, flt, PAGE_RECORDS)
    return page("records.html", session=session, filters=fields, count=count,
                records=shown, tiers=list(runtime.settings.tiers), reasons=REASONS,
                fingerprint_of=record_fingerprint)


async def record(record_id: str, session: Reader, runtime: RuntimeDep) -> Response:
    count, found = await run_in_threadpool(runtime.dlq.query.find, record_id, 1)
    if count != 1 or not found:
        return page("message.html", 404, session=session, title="No such record",
                    message=f"{count} records match {record_id[:80]!r}.")
    paths = runtime.settings.redact_paths
    shown = found[0].model_copy(update={"event": redact(found[0].event, paths),
                                        **failure_shown(found[0], paths)})
    return page("record.html", session=session, r=shown,
                fingerprint=record_fingerprint(found[0]))


async def replay(posted: WriteForm, runtime: RuntimeDep) -> Response:
    session, form = posted.session, posted.form
    fields = _filters(form)
    options = {k: form[k] for k in ("to_tier", "rate") if form.get(k, "").strip()}
    confirmed = form.get("step") == "confirm"
    sel = selection(session, fields, ReplayRequest, **options, dry_run=not confirmed)
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
        _, preview = await run_in_threadpool(runtime.dlq.query.select, sel.to_filter(),
                                             PREVIEW_RECORDS)
    return page("replay.html", session=session, filters=fields, options=options,
                summary=summary, preview=preview, tiers=list(runtime.settings.tiers))


async def purge(posted: WriteForm, runtime: RuntimeDep) -> Response:
    session, form = posted.session, posted.form
    fields = _filters(form)
    sel = selection(session, fields, Selection)
    if form.get("step") != "confirm":
        count, preview = await run_in_threadpool(runtime.dlq.query.select, sel.to_filter(),
                                                 PREVIEW_RECORDS)
        return page("purge.html", session=session, filters=fields, count=count,
                    preview=preview, purged=None)
    purged = await run_in_threadpool(
        lambda: Replayer(runtime).purge(sel.to_filter(), by=session.caller))
    return page("purge.html", session=session, filters=fields, count=purged,
                preview=[], purged=purged)


def add_console_routes(router: APIRouter) -> None:
    """The console's pages on ``router`` (an app's own); none is in the API's schema."""
    router.get(LOGIN_PATH, include_in_schema=False)(login_form)
    router.post(LOGIN_PATH, include_in_schema=False)(login)
    router.post("/console/logout", include_in_schema=False)(logout)
    router.get("/console", include_in_schema=False)(groups)
    router.get("/console/records", include_in_schema=False)(records)
    router.get("/console/records/{record_id}", include_in_schema=False)(record)
    router.post("/console/replay", include_in_schema=False)(replay)
    router.post("/console/purge", include_in_schema=False)(purge)
