"""``pipeline dlq list|stats|show|replay|purge|audit``: the dead-letter queue.

``list --json`` and ``show`` print events with ``redact_paths`` masked
(:mod:`pipeline.core.redact`); ``replay`` sends the stored, whole event."""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import redis

from pipeline.cli.base import (
    EXIT_BROKER,
    EXIT_CONFIG,
    EXIT_REJECTED,
    cli,
    note_if_no_workers,
    progress_bar,
    runtime,
)
from pipeline.core.redact import redact_record, redact_text
from pipeline.core.retry import Reason
from pipeline.dlq.triage import RecordFilter, record_fingerprint
from pipeline.errors import BrokerUnavailable, clip

F = TypeVar("F", bound=Callable[..., Any])
CANDIDATES_SHOWN = 20  # records listed when an id prefix is ambiguous


def filter_options(func: F) -> F:
    """The record filters every DLQ verb accepts."""
    options = [
        click.option("--tier", help="Only records of this tier."),
        click.option("--type", "event_type", help="Only this event type."),
        click.option("--reason", type=click.Choice([r.value for r in Reason])),
        click.option("--exception", help="Exception class (name or dotted path)."),
        click.option("--handler", help="Only this handler."),
        click.option("--fingerprint", "fp", help="Error fingerprint (a prefix is enough)."),
        click.option("--since", type=click.DateTime(), help="last_failed_at >= (UTC)."),
        click.option("--until", type=click.DateTime(), help="last_failed_at < (UTC)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_filter(ids: tuple[str, ...] = (), **kw: Any) -> RecordFilter:
    """The options of :func:`filter_options` as the filter HTTP and the console build too."""
    return RecordFilter.of(ids, tier=kw.get("tier"), type=kw.get("event_type"),
                           reason=kw.get("reason"), exception=kw.get("exception"),
                           handler=kw.get("handler"), fingerprint=kw.get("fp"),
                           since=kw.get("since"), until=kw.get("until"))


def operator() -> str:
    try:
        return f"os:{getpass.getuser()}"
    except (KeyError, OSError):
        return "os:unknown"


@cli.group()
def dlq() -> None:
    """Inspect, group, replay and purge the dead-letter queue."""


@dlq.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print records as a JSON array.")
def dlq_list(limit: int | None, as_json: bool, **kw: Any) -> None:
    """List dead-letter records, oldest first."""
    flt = make_filter(**kw)
    rt = runtime()
    note_if_no_workers(rt)
    _, records = rt.dlq.query.select(flt, limit)
    if as_json:
        masked = rt.settings.redact_paths
        click.echo(json.dumps([redact_record(r.model_dump(mode="json"), masked)
                               for r in records], indent=2))
        return
    click.echo(f"{'last failed (UTC)':<19}  {'id':<8}  {'tier':<9} {'reason':<17} "
               f"{'type':<20} {'handler':<20} error")
    for r in records:
        message = redact_text(r.message, r.event, rt.settings.redact_paths)
        click.echo(f"{r.last_failed_at:%Y-%m-%d %H:%M:%S}  {r.id[:8]}  {r.tier:<9} "
                   f"{r.reason.value:<17} {r.event.get('type', '?')!s:<20} "
                   f"{r.handler or '-':<20} {r.exception.rsplit('.', 1)[-1]}: {message[:60]}")
    click.echo(f"{len(records)} record(s)", err=True)


@dlq.command("stats")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def dlq_stats(as_json: bool, **kw: Any) -> None:
    """Records grouped by error fingerprint: the causes, largest first."""
    flt = make_filter(**kw)
    rt = runtime()
    note_if_no_workers(rt)
    stats = rt.dlq.query.groups(flt)
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in stats], indent=2))
        return
    click.echo(f"{'fingerprint':<12}  {'count':>7}  {'tiers':<16} {'last seen (UTC)':<19}  cause")
    for s in stats:
        last = f"{s.last_seen:%Y-%m-%d %H:%M:%S}" if s.last_seen else "-"
        click.echo(f"{s.fingerprint:<12}  {s.count:>7}  {','.join(sorted(s.tiers)):<16} "
                   f"{last:<19}  {s.handler or '-'}: {s.exception.rsplit('.', 1)[-1]}: "
                   f"{s.message[:70]}")
    click.echo(f"{sum(s.count for s in stats)} record(s) in {len(stats)} group(s)", err=True)


@dlq.command("show")
@click.argument("record_id")
def dlq_show(record_id: str) -> None:
    """The full record (by record id or event id, or a prefix of either), traceback
    included; a prefix that names several records lists them."""
    rt = runtime()
    count, found = rt.dlq.query.find(record_id, CANDIDATES_SHOWN)
    if count == 1 and found:
        data = redact_record(found[0].model_dump(mode="json"), rt.settings.redact_paths)
        data["fingerprint"] = record_fingerprint(found[0])
        trace = data.pop("traceback")
        click.echo(json.dumps(data, indent=2))
        click.echo(trace)
        return
    if not count:
        click.echo(f"no DLQ record or event id starting with {clip(record_id, 80)!r}",
                   err=True)
        sys.exit(EXIT_REJECTED)
    click.echo(f"{clip(record_id, 80)!r} names {count} records; use a longer prefix:",
               err=True)
    for r in found:
        click.echo(f"  record {r.id}  event {r.event_id}  {r.tier}  {r.reason.value}  "
                   f"{r.handler or '-'}", err=True)
    if count > len(found):
        click.echo(f"  ... and {count - len(found)} more", err=True)
    sys.exit(EXIT_REJECTED)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Replay every record.")
@filter_options
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; change nothing.")
@click.option("--rate", type=click.FloatRange(min=0.1), default=None, help="Records per second.")
@click.option("--to-tier", help="Put the work on this tier instead of its own.")
@click.option("--no-validate", is_flag=True, help="Skip re-validating payloads first.")
@click.option("--force", is_flag=True, help="Replay records that would fail again too.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def dlq_replay(ids: tuple[str, ...], select_all: bool, dry_run: bool, rate: float | None,
               to_tier: str | None, no_validate: bool, force: bool, as_json: bool,
               **kw: Any) -> None:
    """Put records back on their tier with attempts reset and their event id kept."""
    from pipeline.dlq.replay import Replayer

    flt = make_filter(ids, **kw)
    if flt.selects_all and not select_all:
        click.echo("error: name record ids, a filter, --fingerprint or --all", err=True)
        sys.exit(EXIT_CONFIG)
    rt = runtime()
    with progress_bar(rt.dlq.depth(), "replaying") as bar:
        try:
            summary = Replayer(rt).replay(flt, by=operator(), to_tier=to_tier, rate_per_s=rate,
                                          dry_run=dry_run, validate=not no_validate,
                                          force=force, progress=bar.update)
        except ValueError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
        except (redis.RedisError, OSError, BrokerUnavailable) as exc:
            click.echo(f"\nerror: broker unreachable during the replay ({exc}); every record "
                       "is either still in the DLQ or back on its tier queue: run the same "
                       "replay again to finish", err=True)
            sys.exit(EXIT_BROKER)
    data = summary.as_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        verb = "would replay" if dry_run else "replayed"
        count = summary.matched - len(summary.would_fail) if dry_run else summary.replayed
        click.echo(f"matched {summary.matched}, {verb} {count}, would fail again "
                   f"{len(summary.would_fail)}" + (" (replayed anyway: --force)" if force else
                                                   " (kept; --force to replay)")
                   + (f", already gone {summary.already_gone}" if summary.already_gone else ""))
        for item in summary.would_fail[:20]:
            click.echo(f"  {item['id'][:8]} event {item['event_id']}: {item['error']}")
        click.echo(f"audit entry {summary.audit_id}")
    if summary.encrypted:
        click.echo(f"error: {summary.encrypted} record(s) not replayed: {data['error']}",
                   err=True)
        sys.exit(EXIT_CONFIG)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@click.option("--all", "select_all", is_flag=True, help="Purge every record.")
@filter_options
@click.option("--yes", is_flag=True, help="Really delete.")
def dlq_purge(ids: tuple[str, ...], select_all: bool, yes: bool, **kw: Any) -> None:
    """Delete records, and say how many."""
    from pipeline.dlq.replay import Replayer

    flt = make_filter(ids, **kw)
    if flt.selects_all and not select_all:
        click.echo("error: name record ids, a filter, --fingerprint or --all", err=True)
        sys.exit(EXIT_CONFIG)
    if not yes:
        click.echo("error: purge deletes records for good; add --yes", err=True)
        sys.exit(EXIT_CONFIG)
    removed = Replayer(runtime()).purge(flt, by=operator())
    click.echo(f"purged {removed} record(s)")


@dlq.command("reindex")
@click.option("--check", is_flag=True, help="Only compare the index with the records.")
def dlq_reindex(check: bool) -> None:
    """Rebuild the DLQ's index (Redis) from its records: after a version without it ran
    (a rolling upgrade), or when --check finds it wrong. Readers rebuild it themselves
    when they see it stale; --check also finds what they cannot (exit 1: rebuild it)."""
    rt = runtime()
    index = rt.dlq.index
    if index is None:
        click.echo("no index: the DLQ is on RabbitMQ, read whole")
        return
    if check:
        same = index.verify()
        click.echo("index matches the records" if same else "index does not match: "
                   "run `pipeline dlq reindex`")
        sys.exit(0 if same else EXIT_REJECTED)
    indexed = index.rebuild()
    if indexed is None:
        click.echo("error: the DLQ kept changing during every rebuild; run it again",
                   err=True)
        sys.exit(EXIT_BROKER)
    click.echo(f"indexed {indexed} record(s)")


@dlq.command("audit")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def dlq_audit(limit: int, as_json: bool) -> None:
    """Who replayed or purged what, newest first."""
    from pipeline.dlq.replay import Replayer

    entries = Replayer(runtime()).audit_entries(limit)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    for e in entries:
        count = e.get("replayed", e.get("purged", 0))
        click.echo(f"{e['at'][:19]}  {e['action']:<7} {e['by']:<20} {count:>7}  "
                   f"{'(dry run) ' if e.get('dry_run') else ''}{json.dumps(e['filter'])}")

