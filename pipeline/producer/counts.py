"""Ingest outcome counters kept in the state Redis, so the exporter serves them.

Every publisher (the HTTP API, ``pipeline send``, a team's process calling
``publish``) adds its results to one hash, ``pipeline:ingest:counts``, field
``tier|type|outcome|reason``, with one pipelined ``HINCRBY`` round trip per publish
call; the exporter (and the API's ``/metrics``) read it back on each scrape as
``pipeline_events_total``. Counting in a process's own registry instead would leave
these counters behind the API's token, and split across the processes that publish.
A failed count is logged, never raised: publishing must not depend on it.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Protocol

import redis

from pipeline.core.state import Keys

__all__ = ["OTHER_TYPE", "TYPE_LABELS_MAX", "add", "read", "tally"]

log = logging.getLogger(__name__)

TYPE_LABELS_MAX = 1000  # distinct event-type label values per process; later ones: "other"
OTHER_TYPE = "other"  # the type label of event types past TYPE_LABELS_MAX
_SEP = "|"  # between labels in a hash field; no tier, type or reason contains it
_types_seen: set[str] = set()

Labels = tuple[str, str, str, str]  # tier, type, outcome, reason


class Counted(Protocol):
    """What is counted of a :class:`pipeline.producer.results.PublishResult`."""

    @property
    def tier(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def reason(self) -> str | None: ...


def tally(results: Sequence[Counted]) -> Counter[Labels]:
    """Results counted by (tier, type, outcome, reason); invalid events have no tier or
    type, and a process past :data:`TYPE_LABELS_MAX` types counts new ones as other."""
    return Counter((r.tier or "", _type_label(r.type), r.outcome, r.reason or "")
                   for r in results)


def add(state: redis.Redis, results: Sequence[Counted]) -> None:
    """Add ``results`` to the shared counters (one round trip; never raises)."""
    if not results:
        return
    try:
        pipe = state.pipeline(transaction=False)
        for labels, n in tally(results).items():
            pipe.hincrby(Keys.ingest_counts(), _SEP.join(labels), n)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        log.warning("ingest counters not updated: %s", exc)


def read(raw: dict[bytes, bytes]) -> Iterator[tuple[Labels, int]]:
    """The counters from the hash's ``HGETALL`` answer."""
    for field, value in raw.items():
        parts = field.decode().split(_SEP)
        if len(parts) == 4:
            yield (parts[0], parts[1], parts[2], parts[3]), int(value)


def _type_label(kind: str | None) -> str:
    if not kind:
        return ""
    if kind in _types_seen:
        return kind
    if len(_types_seen) >= TYPE_LABELS_MAX:
        return OTHER_TYPE
    _types_seen.add(kind)
    return kind
