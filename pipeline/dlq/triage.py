"""Triage of dead-letter records: fingerprints, filters and grouped stats.

Pure logic, no I/O. A fingerprint is handler + exception class + the message
with numbers, ids and hex normalised away, so 50,000 dead records collapse into
the handful of causes they really are.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pipeline.dlq.record import DeadLetterRecord

__all__ = ["FingerprintStat", "RecordFilter", "find_by_id", "fingerprint",
           "group_by_fingerprint", "normalise_message"]

FINGERPRINT_HEX_CHARS = 12  # length of a fingerprint (hex digits of a SHA-1)

_NORMALISERS = (
    (re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
     "<uuid>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"\d{4}-\d\d-\d\d[T ][\d:.]+(?:Z|[+-]\d\d:?\d\d)?"), "<time>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),  # any digit run, even inside a word: v53, user_7
    (re.compile(r"'[^']{24,}'|\"[^\"]{24,}\""), "<str>"),
)


def normalise_message(message: str) -> str:
    """``message`` with uuids, hex, timestamps, numbers and long quoted strings replaced."""
    text = message.strip()
    for pattern, placeholder in _NORMALISERS:
        text = pattern.sub(placeholder, text)
    return text[:500]


def fingerprint(handler: str, exception: str, message: str) -> str:
    key = f"{handler}\x1f{exception}\x1f{normalise_message(message)}"
    return hashlib.sha1(key.encode()).hexdigest()[:FINGERPRINT_HEX_CHARS]


def record_fingerprint(record: DeadLetterRecord) -> str:
    return fingerprint(record.handler, record.exception, record.message)


@dataclass(frozen=True)
class RecordFilter:
    """Which records an operation touches; empty fields match everything."""

    ids: frozenset[str] = frozenset()
    tier: str | None = None
    type: str | None = None
    reason: str | None = None
    exception: str | None = None  # class name or dotted path; a suffix match
    handler: str | None = None
    fingerprint: str | None = None
    since: datetime | None = None  # last_failed_at >= since
    until: datetime | None = None  # last_failed_at < until

    @classmethod
    def of(cls, ids: Iterable[str] = (), *, tier: str | None = None, type: str | None = None,
           reason: str | None = None, exception: str | None = None, handler: str | None = None,
           fingerprint: str | None = None, since: datetime | None = None,
           until: datetime | None = None) -> RecordFilter:
        """The filter the CLI, the HTTP API and the console build alike: naive times are UTC."""
        return cls(ids=frozenset(ids), tier=tier, type=type, reason=reason, exception=exception,
                   handler=handler, fingerprint=fingerprint, since=_utc(since),
                   until=_utc(until))

    @property
    def selects_all(self) -> bool:
        return self == RecordFilter()

    def matches(self, r: DeadLetterRecord) -> bool:
        if self.ids and r.id not in self.ids and r.event_id not in self.ids:
            return False
        if self.tier is not None and r.tier != self.tier:
            return False
        if self.type is not None and r.event.get("type") != self.type:
            return False
        if self.reason is not None and r.reason.value != self.reason:
            return False
        if self.exception is not None and not (
            r.exception == self.exception or r.exception.endswith("." + self.exception)
        ):
            return False
        if self.handler is not None and r.handler != self.handler:
            return False
        if self.since is not None and r.last_failed_at < self.since:
            return False
        if self.until is not None and r.last_failed_at >= self.until:
            return False
        return self.fingerprint is None or record_fingerprint(r).startswith(self.fingerprint)

    def describe(self) -> dict[str, object]:
        """The non-empty criteria, for audit entries and summaries."""
        out: dict[str, object] = {}
        for name in ("tier", "type", "reason", "exception", "handler", "fingerprint"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.ids:
            out["ids"] = sorted(self.ids)[:20] + (["..."] if len(self.ids) > 20 else [])
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        return out or {"all": True}


def _utc(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@dataclass
class FingerprintStat:
    """One cause of dead letters: how many, where, since when."""

    fingerprint: str
    handler: str
    exception: str
    message: str  # normalised
    reasons: set[str] = field(default_factory=set)
    tiers: set[str] = field(default_factory=set)
    count: int = 0
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    per_hour: dict[datetime, int] = field(default_factory=dict)  # last failures by UTC hour

    def as_dict(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint, "count": self.count, "handler": self.handler,
            "exception": self.exception, "message": self.message,
            "reasons": sorted(self.reasons), "tiers": sorted(self.tiers),
            "first_seen": self.first_seen.isoformat() if self.first_seen else None,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
        }


def group_by_fingerprint(records: Iterable[DeadLetterRecord],
                         shown: Callable[[DeadLetterRecord], str] | None = None,
                         ) -> list[FingerprintStat]:
    """Stats per fingerprint, the largest group first. A group's message is its first
    record's, as ``shown`` gives it (a view's masking; the fingerprint is unchanged)."""
    groups: dict[str, FingerprintStat] = {}
    for r in records:
        fp = record_fingerprint(r)
        stat = groups.get(fp)
        if stat is None:
            stat = groups[fp] = FingerprintStat(fp, r.handler, r.exception,
                                                normalise_message(
                                                    r.message if shown is None else shown(r)))
        stat.count += 1
        stat.tiers.add(r.tier)
        stat.reasons.add(r.reason.value)
        if stat.first_seen is None or r.first_failed_at < stat.first_seen:
            stat.first_seen = r.first_failed_at
        if stat.last_seen is None or r.last_failed_at > stat.last_seen:
            stat.last_seen = r.last_failed_at
        hour = r.last_failed_at.replace(minute=0, second=0, microsecond=0)
        stat.per_hour[hour] = stat.per_hour.get(hour, 0) + 1
    return sorted(groups.values(), key=lambda s: (-s.count, s.fingerprint))


def select(records: Sequence[DeadLetterRecord], flt: RecordFilter) -> list[DeadLetterRecord]:
    return [r for r in records if flt.matches(r)]


def find_by_id(records: Iterable[DeadLetterRecord], query: str) -> list[DeadLetterRecord]:
    """The records ``query`` names: the one whose record id it is; else every record
    whose record id or event id starts with it (an event id can name several records:
    one per handler and attempt). One result is the answer; several are candidates."""
    query = query.strip().lower()
    if not query:
        return []
    found = []
    for r in records:
        if r.id == query:
            return [r]
        if r.id.startswith(query) or r.event_id.lower().startswith(query):
            found.append(r)
    return found
