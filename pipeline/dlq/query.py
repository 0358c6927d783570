"""Reading the DLQ for the CLI, the HTTP API and the console: one code path for all three.

Each read uses the index (:mod:`pipeline.dlq.index`) when it is ready and otherwise
reads every record (RabbitMQ, a stale index that cannot be rebuilt now), with the
same answer either way: groups largest first, records oldest first. An indexed read
that meets an entry whose raw hash is not the indexed one invalidates the index and
answers by reading every record instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pipeline.dlq.index import (
    M_EID,
    M_FIRST,
    M_FP,
    M_HOUR,
    M_ID,
    M_LAST,
    M_REASON,
    M_TIER,
    M_TYPE,
    DlqIndex,
    Meta,
    raw_hash,
)
from pipeline.dlq.record import DeadLetterRecord, decode_body, decode_entry
from pipeline.dlq.triage import FingerprintStat, RecordFilter, find_by_id, group_by_fingerprint

__all__ = ["DlqQuery", "Entry", "RecordStore"]


class RecordStore(Protocol):
    """What a query reads: a :class:`pipeline.dlq.queue.DeadLetterQueue`."""

    @property
    def index(self) -> DlqIndex | None: ...

    def iter_records(self, limit: int | None = None) -> Iterator[DeadLetterRecord]: ...

    def entries(self, limit: int | None = None) -> Iterator[tuple[bytes, DeadLetterRecord]]: ...

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_Group = tuple[int, dict[str, str]]  # a group's count and its index hash


class Entry:
    """One DLQ entry: its raw bytes (Redis), its index seq ("" unindexed), its record
    (decoded when first asked for) or just its fields (:attr:`body`, cheaper)."""

    __slots__ = ("_record", "raw", "seq")

    def __init__(self, raw: bytes, seq: str, record: DeadLetterRecord | None = None) -> None:
        self.raw, self.seq, self._record = raw, seq, record

    @property
    def record(self) -> DeadLetterRecord:
        if self._record is None:
            self._record = decode_entry(self.raw)
        return self._record

    @property
    def body(self) -> dict[str, Any]:
        """The record's fields as stored, without validating them."""
        if self._record is not None:
            return self._record.model_dump(mode="json")
        return decode_body(self.raw)


class _Stale(Exception):
    """The index disagrees with the list: answer by reading every record."""


def _when(us: str | float) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _us(when: datetime | None) -> int | None:
    if when is None:
        return None
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def meta_matches(m: Meta, flt: RecordFilter) -> bool:
    """``flt``'s record-level criteria (ids, tier, type, reason, time) on a meta (pure)."""
    if flt.ids and m[M_ID] not in flt.ids and m[M_EID] not in flt.ids:
        return False
    if (flt.tier is not None and m[M_TIER] != flt.tier) or (
            flt.type is not None and m[M_TYPE] != flt.type):
        return False
    if flt.reason is not None and m[M_REASON] != flt.reason:
        return False
    since, until, last = _us(flt.since), _us(flt.until), int(m[M_LAST])
    return (since is None or last >= since) and (until is None or last < until)


def group_matches(fp: str, info: dict[str, str], flt: RecordFilter) -> bool:
    """``flt``'s group-level criteria (fingerprint, handler, exception) on a group (pure)."""
    if flt.fingerprint is not None and not fp.startswith(flt.fingerprint):
        return False
    if flt.handler is not None and info.get("handler", "") != flt.handler:
        return False
    exc = info.get("exception", "")
    return flt.exception is None or exc == flt.exception or exc.endswith("." + flt.exception)


def record_level(flt: RecordFilter) -> bool:
    return bool(flt.ids) or any(v is not None for v in (flt.tier, flt.type, flt.reason,
                                                         flt.since, flt.until))


def stat_of(fp: str, info: dict[str, str], count: int, first_us: float | None,
            last_us: float | None) -> FingerprintStat:
    """A group's stats from its index hash (pure)."""
    stat = FingerprintStat(fp, info.get("handler", ""), info.get("exception", ""),
                           info.get("message", ""), count=count)
    for name, value in info.items():
        kind, _, what = name.partition(":")
        if kind == "t":
            stat.tiers.add(what)
        elif kind == "r":
            stat.reasons.add(what)
        elif kind == "h":
            stat.per_hour[datetime.fromtimestamp(int(what), UTC)] = int(value)
    stat.first_seen = None if first_us is None else _when(first_us)
    stat.last_seen = None if last_us is None else _when(last_us)
    return stat


def stats_of_metas(metas: list[Meta], infos: dict[str, dict[str, str]]) -> list[FingerprintStat]:
    """Groups of some entries from their metas (pure), largest first."""
    groups: dict[str, FingerprintStat] = {}
    for m in metas:
        fp = m[M_FP]
        stat = groups.get(fp)
        if stat is None:
            stat = groups[fp] = stat_of(fp, {k: v for k, v in infos[fp].items()
                                             if ":" not in k}, 0, None, None)
        stat.count += 1
        stat.tiers.add(m[M_TIER])
        stat.reasons.add(m[M_REASON])
        first, last, hour = _when(m[M_FIRST]), _when(m[M_LAST]), int(m[M_HOUR])
        stat.first_seen = first if stat.first_seen is None else min(stat.first_seen, first)
        stat.last_seen = last if stat.last_seen is None else max(stat.last_seen, last)
        at = datetime.fromtimestamp(hour, UTC)
        stat.per_hour[at] = stat.per_hour.get(at, 0) + 1
    return sorted(groups.values(), key=lambda s: (-s.count, s.fingerprint))


class DlqQuery:
    """Groups, filtered records and lookups by id over one DLQ."""

    def __init__(self, dlq: RecordStore) -> None:
        self.dlq = dlq

    def _index(self) -> DlqIndex | None:
        index = self.dlq.index
        return index if index is not None and index.ready() else None

    def groups(self, flt: RecordFilter | None = None) -> list[FingerprintStat]:
        flt = flt or RecordFilter()
        index = self._index()
        if index is not None:
            try:
                return self._indexed_groups(index, flt)
            except _Stale:
                pass
        return group_by_fingerprint(r for r in self.dlq.iter_records() if flt.matches(r))

    def select(self, flt: RecordFilter, keep: int | None = None
               ) -> tuple[int, list[DeadLetterRecord]]:
        """How many records match, and the first ``keep`` of them (None: all), oldest first."""
        count, entries = self.entries(flt, keep)
        return count, [e.record for e in entries]

    def entries(self, flt: RecordFilter, keep: int | None = None) -> tuple[int, list[Entry]]:
        index = self._index()
        if index is not None:
            try:
                count, seqs = self._seqs(index, flt, keep)
                return count, self._read(index, seqs)
            except _Stale:
                pass
        count, kept = 0, list[Entry]()
        for raw, record in self.dlq.entries():
            if flt.matches(record):
                count += 1
                if keep is None or len(kept) < keep:
                    kept.append(Entry(raw, "", record))
        return count, kept

    def find(self, query: str, keep: int) -> tuple[int, list[DeadLetterRecord]]:
        """The records ``query`` names (see :func:`pipeline.dlq.triage.find_by_id`): how
        many, and the first ``keep`` of them."""
        index = self._index()
        if index is not None:
            try:
                return self._indexed_find(index, query.strip().lower(), keep)
            except _Stale:
                pass
        found = find_by_id(self.dlq.iter_records(), query)
        return len(found), found[:keep]

    # -- indexed reads ---------------------------------------------------------------
    def _candidates(self, index: DlqIndex, flt: RecordFilter) -> dict[str, _Group]:
        counted = index.scored("groups")
        pipe = index.client.pipeline(transaction=False)
        for fp, _ in counted:
            pipe.hgetall(index.key(f"g:{fp}"))
        infos = pipe.execute()
        out = {}
        for (fp, n), raw_info in zip(counted, infos, strict=True):
            info = {k.decode(): v.decode() for k, v in raw_info.items()}
            if group_matches(fp, info, flt):
                out[fp] = (int(n), info)
        return out

    def _indexed_groups(self, index: DlqIndex, flt: RecordFilter) -> list[FingerprintStat]:
        groups = self._candidates(index, flt)
        if record_level(flt):
            _, seqs = self._seqs(index, flt, None, groups)
            pairs = [(s, m) for s, m in zip(seqs, index.metas(seqs), strict=True) if m]
            infos = {fp: info for fp, (_, info) in groups.items()}
            return stats_of_metas([m for _, m in pairs], infos)
        pipe = index.client.pipeline(transaction=False)
        for fp in groups:
            pipe.zrange(index.key(f"g:{fp}:first"), 0, 0, withscores=True)
            pipe.zrange(index.key(f"g:{fp}:last"), -1, -1, withscores=True)
        ends = pipe.execute()
        stats = []
        for i, (fp, (count, info)) in enumerate(groups.items()):
            first, last = ends[2 * i], ends[2 * i + 1]
            stats.append(stat_of(fp, info, count, first[0][1] if first else None,
                                 last[0][1] if last else None))
        return sorted(stats, key=lambda s: (-s.count, s.fingerprint))

    def _seqs(self, index: DlqIndex, flt: RecordFilter, keep: int | None,
              groups: dict[str, _Group] | None = None) -> tuple[int, list[str]]:
        """How many match, and the seqs of the first ``keep``, oldest first."""
        by_group = any(v is not None for v in (flt.fingerprint, flt.handler, flt.exception))
        if by_group or flt.ids:
            groups = self._candidates(index, flt) if groups is None else groups
        if flt.ids:
            return self._by_ids(index, flt, keep, groups if by_group else None)
        facets = [f"{kind}:{value}" for kind, value in (
            ("t", flt.tier), ("r", flt.reason), ("y", flt.type)) if value is not None]
        return index.select(keep, list(groups or ()) if by_group else None, facets,
                            _us(flt.since), _us(flt.until))

    def _by_ids(self, index: DlqIndex, flt: RecordFilter, keep: int | None,
                groups: dict[str, _Group] | None) -> tuple[int, list[str]]:
        members = [m for i in flt.ids
                   for m in (*index.prefixed(f"r:{i}:"), *index.prefixed(f"e:{i.lower()}:"))]
        seqs = sorted({m.rsplit(":", 1)[1] for m in members}, key=int)
        pairs = [(s, m) for s, m in zip(seqs, index.metas(seqs), strict=True)
                 if m is not None and meta_matches(m, flt)
                 and (groups is None or m[M_FP] in groups)]
        return len(pairs), [s for s, _ in (pairs if keep is None else pairs[:keep])]

    def _read(self, index: DlqIndex, seqs: list[str]) -> list[Entry]:
        fetched = index.fetch(seqs)
        out = []
        for seq, found in zip(seqs, fetched, strict=True):
            if found is None:
                continue  # removed since (replayed, purged, evicted): not there any more
            raw, indexed = found
            if raw_hash(raw) != indexed:
                index.invalidate()
                raise _Stale(seq)
            out.append(Entry(raw, seq))
        return out

    def _indexed_find(self, index: DlqIndex, query: str, keep: int
                      ) -> tuple[int, list[DeadLetterRecord]]:
        if not query:
            return 0, []
        exact = index.prefixed(f"r:{query}:")
        members = exact or [*index.prefixed(f"r:{query}"), *index.prefixed(f"e:{query}")]
        seqs = sorted({m.rsplit(":", 1)[1] for m in members}, key=int)
        metas = index.metas(seqs)
        pairs = [(s, m) for s, m in zip(seqs, metas, strict=True) if m is not None and (
            m[M_ID].startswith(query) or m[M_EID].lower().startswith(query))]
        if exact:
            pairs = [p for p in pairs if p[1][M_ID] == query][:1]
        return len(pairs), [e.record for e in self._read(index, [s for s, _ in pairs[:keep]])]

