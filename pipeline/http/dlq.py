"""DLQ operations over HTTP, under the API's auth: the same features as ``pipeline dlq``.

=======================  ===============================================
``GET /dlq``              records (filters as query parameters)
``GET /dlq/stats``        records grouped by error fingerprint
``GET /dlq/audit``        replay and purge audit entries, newest first
``GET /dlq/{id}``         one record (record id, id prefix or event id)
``POST /dlq/replay``      replay by ids / filters / fingerprint / all
``POST /dlq/purge``       delete by ids / filters / all (``"yes": true``)
=======================  ===============================================

Records are shown with ``redact_paths`` masked (:mod:`pipeline.core.redact`); replay
sends the stored, whole event. Reading needs the ``dlq:read`` scope, replay and
purge ``dlq:write``; audit entries name the token of every replay and purge.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.redact import redact_record
from pipeline.core.retry import Reason  # every reason a record can carry, one list
from pipeline.dlq.replay import Replayer
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from pipeline.errors import clip
from pipeline.http.deps import DlqReader, DlqWriter, RuntimeDep

__all__ = ["PurgeRequest", "ReplayRequest", "Selection", "add_dlq_routes"]

LIST_LIMIT_MAX = 10_000  # most records one GET /dlq returns
CANDIDATES_SHOWN = 20  # records listed when an id prefix names several


class Selection(BaseModel):
    """Which records a replay or purge touches."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] = Field(default_factory=list, max_length=100_000)
    all: bool = False
    tier: str | None = None
    type: str | None = None
    reason: Reason | None = None
    exception: str | None = None
    handler: str | None = None
    fingerprint: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @property
    def unselective(self) -> bool:
        """Selects every record without saying ``all``: refused by replay and purge."""
        return self.to_filter().selects_all and not self.all

    def to_filter(self) -> RecordFilter:
        return RecordFilter.of(self.ids, tier=self.tier, type=self.type,
                               reason=None if self.reason is None else self.reason.value,
                               exception=self.exception, handler=self.handler,
                               fingerprint=self.fingerprint, since=self.since,
                               until=self.until)


class ReplayRequest(Selection):
    dry_run: bool = False
    rate: Annotated[float, Field(gt=0, le=100_000)] | None = None
    to_tier: str | None = None
    validate_payloads: bool = True
    force: bool = False


class PurgeRequest(Selection):
    yes: bool = False


def _unselective(sel: Selection) -> JSONResponse | None:
    if sel.unselective:
        return JSONResponse({"error": "name ids, a filter, a fingerprint or all=true"}, 422)
    return None


def query_filter(tier: str | None = None, type: str | None = None,
                 reason: Reason | None = None, exception: str | None = None,
                 handler: str | None = None, fingerprint: str | None = None,
                 since: datetime | None = None,
                 until: datetime | None = None) -> RecordFilter:
    """A dependency: the records the query parameters select (all of them: none)."""
    return Selection(tier=tier, type=type, reason=reason, exception=exception,
                     handler=handler, fingerprint=fingerprint, since=since,
                     until=until).to_filter()


Filters = Annotated[RecordFilter, Depends(query_filter)]


async def dlq_list(by: DlqReader, flt: Filters, runtime: RuntimeDep,
                   limit: Annotated[int, Query(ge=1, le=LIST_LIMIT_MAX)] = 100) -> Any:
    _, records = await run_in_threadpool(runtime.dlq.query.select, flt, limit)
    paths = runtime.settings.redact_paths
    return [redact_record(r.model_dump(mode="json"), paths) for r in records]


async def dlq_stats(by: DlqReader, flt: Filters, runtime: RuntimeDep) -> Any:
    stats = await run_in_threadpool(runtime.dlq.query.groups, flt)
    return [s.as_dict() for s in stats]


async def dlq_audit(by: DlqReader, runtime: RuntimeDep,
                    limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> Any:
    return await run_in_threadpool(Replayer(runtime).audit_entries, limit)


async def dlq_show(by: DlqReader, record_id: str, runtime: RuntimeDep) -> Any:
    """A record by record id or event id, or a prefix of either."""
    count, found = await run_in_threadpool(runtime.dlq.query.find, record_id,
                                           CANDIDATES_SHOWN)
    if not found:
        return JSONResponse({"error": f"no DLQ record {clip(record_id, 80)!r}"}, 404)
    if count == 1:
        record = found[0]
        return {**redact_record(record.model_dump(mode="json"),
                                runtime.settings.redact_paths),
                "fingerprint": record_fingerprint(record)}
    return JSONResponse({"error": f"{count} records match; use a longer prefix",
                         "candidates": [{"id": r.id, "event_id": r.event_id, "tier": r.tier,
                                         "reason": r.reason.value, "handler": r.handler}
                                        for r in found]}, 409)


async def dlq_replay(by: DlqWriter, request: ReplayRequest, runtime: RuntimeDep) -> Any:
    refused = _unselective(request)
    if refused is not None:
        return refused
    if request.to_tier is not None and request.to_tier not in runtime.settings.tiers:
        return JSONResponse({"error": f"to_tier {request.to_tier!r} is not a tier"}, 422)
    summary = await run_in_threadpool(
        lambda: Replayer(runtime).replay(
            request.to_filter(), by=by.caller, to_tier=request.to_tier,
            rate_per_s=request.rate,
            dry_run=request.dry_run, validate=request.validate_payloads,
            force=request.force))
    return JSONResponse(summary.as_dict(), 409 if summary.encrypted else 200)


async def dlq_purge(by: DlqWriter, request: PurgeRequest, runtime: RuntimeDep) -> Any:
    refused = _unselective(request)
    if refused is not None:
        return refused
    if not request.yes:
        return JSONResponse({"error": "purge deletes records for good: send yes=true"}, 422)
    purged = await run_in_threadpool(Replayer(runtime).purge, request.to_filter(),
                                     by=by.caller)
    return {"purged": purged}


def add_dlq_routes(router: APIRouter) -> None:
    """The ``/dlq`` routes on ``router`` (an app's own)."""
    router.get("/dlq", tags=["dlq"])(dlq_list)
    router.get("/dlq/stats", tags=["dlq"])(dlq_stats)
    router.get("/dlq/audit", tags=["dlq"])(dlq_audit)
    router.get("/dlq/{record_id}", tags=["dlq"], responses={
        404: {}, 409: {"description": "a prefix of several records"}})(dlq_show)
    router.post("/dlq/replay", tags=["dlq"], responses={
        422: {}, 409: {"description": "encrypted records, no key: kept"}})(dlq_replay)
    router.post("/dlq/purge", tags=["dlq"], responses={422: {}})(dlq_purge)
