"""The DLQ index (Redis): records by fingerprint group, with counters and hour buckets.

The DLQ list stays the truth; the index is derived from it so a console page reads
one group instead of decoding the whole DLQ. **Invariant**: every Lua step that
writes or removes a DLQ entry (the settle step's dead letter, :meth:`put`, replay,
purge, retention) updates the index in the same script, so no crash can leave them
apart. Each entry has a sequence number ``seq`` (its age order); its ``meta`` names
its record, fingerprint, facets and a hash of the raw entry, which every read checks.

Readers use the index only while :meth:`DlqIndex.ready`: the ``ok`` mark is set (by a
rebuild), the entry counts agree and the oldest and newest entries hash as indexed.
Otherwise (a DLQ written by a previous version, a foreign ``LPUSH``) it is rebuilt
from the records, and while that cannot happen readers fall back to reading every
record, so the index can make a page faster but never hide a record.

Keys under ``pipeline:dlqix:<queue>:``: ``seq`` (counter), ``order`` (zset seq),
``meta`` (hash seq -> JSON), ``ids`` (lex zset ``r:<id>:<seq>``, ``e:<event id>:<seq>``),
``groups`` (zset fingerprint -> count), ``g:<fp>`` (hash: handler, exception, message,
``t:<tier>``, ``r:<reason>``, ``h:<hour epoch>`` counts), ``g:<fp>:seq|first|last``
(zsets of seq by seq, first and last failure in microseconds), ``ok``, ``lock``.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import redis

from pipeline.core.redact import redact_text
from pipeline.core.state import Keys
from pipeline.dlq.record import DeadLetterRecord, decode_entry
from pipeline.dlq.scripts import CHECK_LUA, FETCH_LUA, SELECT_LUA
from pipeline.dlq.triage import normalise_message, record_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["DlqIndex", "Meta", "entry_meta", "raw_hash"]

log = logging.getLogger(__name__)

REBUILD_TRIES = 5  # rebuilds attempted while the DLQ keeps changing under one
REBUILD_LOCK_S = 300  # one rebuild at a time; a crashed rebuilder's lock expires
READ_PAGE = 1000  # entries per LRANGE while rebuilding
WRITE_BATCH = 5000  # members per ZADD or HSET while rebuilding
FETCH_CHUNK = 200  # most entries one LRANGE of a fetch reads (measured: 200 beat 50 and 1000)
FETCH_MAX = 2000  # most entries one fetch script reads
RAW_HASH_CHARS = 16  # hex digits of SHA-1 kept to recognise a raw entry

# meta: [id, event id, fp, tier, type, reason, handler, exception, first us, last us,
#        hour epoch, event id lower-cased, raw hash]
(M_ID, M_EID, M_FP, M_TIER, M_TYPE, M_REASON, M_HANDLER, M_EXC, M_FIRST, M_LAST, M_HOUR,
 M_EID_LOWER, M_HASH) = range(13)
Meta = list[str]

def raw_hash(raw: bytes) -> str:
    return hashlib.sha1(raw).hexdigest()[:RAW_HASH_CHARS]


def _us(when: datetime) -> int:
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    delta = aware - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def entry_meta(record: DeadLetterRecord, raw: bytes,
               redact_paths: Sequence[str] = ()) -> tuple[str, str]:
    """``(meta JSON, normalised message)``: what the index keeps of one entry (pure). The
    message is kept as every view shows it: the event's values at ``redact_paths``
    masked (the groups page reads it from here, never from the record)."""
    last = record.last_failed_at
    hour = last.replace(minute=0, second=0, microsecond=0)
    kind = record.event.get("type")
    meta = [record.id, record.event_id, record_fingerprint(record), record.tier,
            "" if kind is None else str(kind), record.reason.value, record.handler,
            record.exception, str(_us(record.first_failed_at)), str(_us(last)),
            str(_us(hour) // 1_000_000), record.event_id.lower(), raw_hash(raw)]
    message = redact_text(record.message, record.event, redact_paths)
    return orjson.dumps(meta).decode(), normalise_message(message)


def layout(entries: list[tuple[str, str]]
           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str | int]], list[str]]:
    """The index of ``entries`` (oldest first) as the Lua steps would have built it one by
    one (``ix_add``): sorted sets, hashes (by key suffix) and facet names (pure)."""
    zsets: dict[str, dict[str, float]] = defaultdict(dict)
    hashes: dict[str, dict[str, str | int]] = defaultdict(dict)
    for n, (meta, gmsg) in enumerate(entries, start=1):
        m, s = orjson.loads(meta), str(n)
        g = f"g:{m[M_FP]}"
        zsets["order"][s] = n
        hashes["meta"][s] = meta
        zsets["ids"].update({f"r:{m[M_ID]}:{s}": 0, f"e:{m[M_EID_LOWER]}:{s}": 0})
        zsets[g + ":seq"][s] = n
        zsets[g + ":first"][s] = int(m[M_FIRST])
        zsets[g + ":last"][s] = int(m[M_LAST])
        group = hashes[g]
        for field, value in (("handler", m[M_HANDLER]), ("exception", m[M_EXC]),
                             ("message", gmsg)):
            group.setdefault(field, value)
        for field in (f"t:{m[M_TIER]}", f"r:{m[M_REASON]}", f"h:{m[M_HOUR]}"):
            group[field] = int(group.get(field, 0)) + 1
        zsets["groups"][m[M_FP]] = zsets["groups"].get(m[M_FP], 0) + 1
        for facet in (f"t:{m[M_TIER]}", f"r:{m[M_REASON]}", f"y:{m[M_TYPE]}"):
            zsets[f"f:{facet}"][s] = n
        zsets["f:last"][s] = int(m[M_LAST])
    facets = sorted(name[2:] for name in zsets if name.startswith("f:") and name != "f:last")
    return zsets, hashes, facets


class DlqIndex:
    """The index of one Redis DLQ list: checks, rebuilds and raw reads by seq."""

    def __init__(self, client: redis.Redis, queue: str,
                 redact_paths: Sequence[str] = ()) -> None:
        self.client = client
        self.queue = queue
        self.redact_paths = tuple(redact_paths)  # masked in the group messages kept
        self.prefix = Keys.dlq_index(queue)
        self._check = client.register_script(CHECK_LUA)
        self._fetch = client.register_script(FETCH_LUA)
        self._select = client.register_script(SELECT_LUA)

    def key(self, name: str) -> str:
        return self.prefix + name

    def state(self) -> str:
        """``ok``, or why the index cannot be used (``missing``, ``count``, ``ends``)."""
        answer = self._check(keys=[self.queue], args=[self.prefix, RAW_HASH_CHARS])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def ready(self) -> bool:
        """Whether readers may use the index; rebuilds it first when it is stale and no
        other process is rebuilding. False: read every record instead."""
        why = self.state()
        if why == "ok":
            return True
        if not self.client.set(self.key("lock"), "1", nx=True, ex=REBUILD_LOCK_S):
            return False
        try:
            log.warning("DLQ index of %r is not usable (%s): rebuilding it", self.queue, why)
            return self.rebuild() is not None
        finally:
            self.client.delete(self.key("lock"))

    def verify(self) -> bool:
        """Whether the index holds exactly the list's entries (reads all of them: for
        ``pipeline dlq reindex --check``; a DLQ changing meanwhile may read as False)."""
        if self.state() != "ok":
            return False
        listed = Counter(raw_hash(raw) for raw in self._raw_oldest_first(self.client))
        metas: Any = self.client.hvals(self.key("meta"))
        return listed == Counter(orjson.loads(m)[M_HASH] for m in metas)

    def invalidate(self) -> None:
        """A read found the index wrong: readers scan until it is rebuilt."""
        self.client.delete(self.key("ok"))

    def rebuild(self) -> int | None:
        """Rebuild the index from the records in one transaction that fails if the list
        changed meanwhile (retried); returns the number of entries, None if the DLQ
        never stood still long enough."""
        known: dict[bytes, tuple[str, str]] = {}  # raw hash -> entry, kept across tries
        for _ in range(REBUILD_TRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.queue)  # type: ignore[no-untyped-call]
                    entries = [self._entry(raw, known) for raw in self._raw_oldest_first(pipe)]
                    old = self._old_keys(pipe)
                    pipe.multi()
                    self._write(pipe, entries, old)
                    pipe.execute()
                    return len(entries)
                except redis.WatchError:
                    continue
        log.warning("DLQ index of %r: the DLQ kept changing during %d rebuilds",
                    self.queue, REBUILD_TRIES)
        return None

    def _entry(self, raw: bytes, known: dict[bytes, tuple[str, str]]) -> tuple[str, str]:
        digest = hashlib.sha1(raw).digest()
        found = known.get(digest)
        if found is None:
            found = known[digest] = entry_meta(decode_entry(raw), raw, self.redact_paths)
        return found

    def _raw_oldest_first(self, pipe: Any) -> Iterator[bytes]:
        end = -1
        while True:
            raw: list[bytes] = pipe.lrange(self.queue, end - READ_PAGE + 1, end)
            yield from reversed(raw)
            if len(raw) < READ_PAGE:
                return
            end -= READ_PAGE

    def _old_keys(self, pipe: Any) -> list[str]:
        """The index's per-group and per-facet key names now."""
        groups = [f"g:{fp.decode()}" for fp in pipe.zrange(self.key("groups"), 0, -1)]
        return groups + [f"f:{f.decode()}" for f in pipe.smembers(self.key("facets"))]

    def _write(self, pipe: Any, entries: list[tuple[str, str]], old: list[str]) -> None:
        for name in old:
            g = self.key(name)
            pipe.delete(g, g + ":seq", g + ":first", g + ":last")
        pipe.delete(*(self.key(k) for k in ("seq", "order", "meta", "ids", "groups", "facets",
                                             "f:last")))
        zsets, hashes, facets = layout(entries)
        for name, scored in zsets.items():
            items = list(scored.items())
            for i in range(0, len(items), WRITE_BATCH):
                pipe.zadd(self.key(name), dict(items[i:i + WRITE_BATCH]))
        for name, fields in hashes.items():
            pairs = list(fields.items())
            for i in range(0, len(pairs), WRITE_BATCH):
                pipe.hset(self.key(name), mapping=dict(pairs[i:i + WRITE_BATCH]))
        if facets:
            pipe.sadd(self.key("facets"), *facets)
        pipe.set(self.key("seq"), len(entries))
        pipe.set(self.key("ok"), "1")

    def fetch(self, seqs: list[str]) -> list[tuple[bytes, str] | None]:
        """The raw entry at each seq with its indexed hash (None: gone), read atomically
        :data:`FETCH_MAX` at a time (no one script holds the broker for long)."""
        out: list[tuple[bytes, str] | None] = []
        for i in range(0, len(seqs), FETCH_MAX):
            got: Any = self._fetch(keys=[self.queue],
                                   args=[self.prefix, FETCH_CHUNK, *seqs[i:i + FETCH_MAX]])
            out += [None if got[j] is None else (got[j], (got[j + 1] or b"").decode())
                    for j in range(0, len(got), 2)]
        return out

    def select(self, keep: int | None, fps: list[str] | None, facets: list[str],
               since_us: int | None, until_us: int | None) -> tuple[int, list[str]]:
        """How many entries of the groups ``fps`` (None: any) are in every facet set
        (``t:<tier>``, ``r:<reason>``, ``y:<type>``) and failed last in [since, until);
        and the seqs of the first ``keep`` (None: all), oldest first."""
        groups = [-1] if fps is None else [len(fps), *fps]
        answer: Any = self._select(keys=[], args=[
            self.prefix, keep or 0, *groups, len(facets), *facets,
            "" if since_us is None else since_us, "" if until_us is None else until_us])
        return int(answer[0]), [s.decode() for s in answer[1]]

    def metas(self, seqs: list[str]) -> list[Meta | None]:
        out: list[Meta | None] = []
        for i in range(0, len(seqs), 10_000):
            chunk: Any = self.client.hmget(self.key("meta"), seqs[i:i + 10_000])
            out.extend(None if m is None else orjson.loads(m) for m in chunk)
        return out

    def members(self, name: str, start: int = 0, end: int = -1) -> list[str]:
        """Members of the index's sorted set ``name``, in score order."""
        found: Any = self.client.zrange(self.key(name), start, end)
        return [m.decode() for m in found]

    def scored(self, name: str, start: int = 0, end: int = -1) -> list[tuple[str, float]]:
        found: Any = self.client.zrange(self.key(name), start, end, withscores=True)
        return [(m.decode(), float(score)) for m, score in found]

    def prefixed(self, prefix: str) -> list[str]:
        """Members of the ``ids`` set that start with ``prefix``."""
        low = prefix.encode()
        found: Any = self.client.zrangebylex(self.key("ids"), b"[" + low, b"[" + low + b"\xff")
        return [m.decode() for m in found]
