"""``pipeline breaker open|close|status NAME``: manual override of circuit breakers."""

from __future__ import annotations

import json

import click

from pipeline.cli.base import cli, note_if_no_workers, runtime


@cli.group()
def breaker() -> None:
    """Inspect or force the circuit breaker of a downstream."""


@breaker.command("status")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def breaker_status(names: tuple[str, ...], as_json: bool) -> None:
    """State of NAMES (default: every configured breaker)."""
    rt = runtime()
    statuses = [rt.breakers.status(n) for n in (names or tuple(rt.settings.breakers))]
    note_if_no_workers(rt)
    if as_json:
        click.echo(json.dumps(statuses, indent=2))
        return
    for s in statuses:
        click.echo(f"{s['name']:<24} {s['state']:<14} opened {s['opened_total']} time(s), "
                   f"{s['consecutive_failures']} failure(s) in a row")


@breaker.command("open")
@click.argument("name")
def breaker_open(name: str) -> None:
    """Force NAME open: its handlers' tasks are deferred until `breaker close`."""
    runtime().breakers.force(name, "open")
    click.echo(f"{name}: forced open")


@breaker.command("close")
@click.argument("name")
def breaker_close(name: str) -> None:
    """Lift any override and reset NAME to closed; the work it deferred is due now."""
    rt = runtime()
    rt.breakers.force(name, None)
    released = rt.schedule.release(name)
    click.echo(f"{name}: closed; {released} deferred task(s) due now")
