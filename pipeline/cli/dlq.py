"""``pipeline dlq ...``: the dead-letter queue."""

from __future__ import annotations

import json

import click

from pipeline.cli.base import cli, runtime


@cli.group()
def dlq() -> None:
    """Inspect the dead-letter queue."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print records as a JSON array.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
def dlq_list(as_json: bool, limit: int | None) -> None:
    """List dead-letter records, oldest first."""
    records = runtime().dlq.records(limit)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    for r in records:
        click.echo(f"{r.last_failed_at:%Y-%m-%d %H:%M:%S}  {r.tier:<9} {r.reason.value:<18} "
                   f"{r.event.get('type', '?'):<20} {r.handler:<20} {r.exception}: "
                   f"{r.message[:60]}")
    click.echo(f"{len(records)} record(s)", err=True)


