"""``pipeline demo report``: account for a run of the demo handlers."""

from __future__ import annotations

import json

import click

from pipeline.cli.base import cli, runtime


@cli.group()
def demo() -> None:
    """Demo handlers: account for a run."""


@demo.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--ids", "with_ids", is_flag=True, help="Include the processed event ids.")
def demo_report(as_json: bool, with_ids: bool) -> None:
    """How many demo events were processed, and how many effects ran twice."""
    from pipeline.demo import report

    result = report(runtime().state, with_ids=with_ids)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"processed {result['processed']}, duplicate effects "
                   f"{result['duplicate_effects']}")




@demo.command("fix")
@click.argument("handler_name", metavar="HANDLER", default="demo.fail")
@click.option("--undo", is_flag=True, help="Break it again.")
def demo_fix(handler_name: str, undo: bool) -> None:
    """Pretend a fix for a failing demo handler was deployed (or --undo it)."""
    from pipeline.demo import fixed_key

    state = runtime().state
    if undo:
        state.delete(fixed_key(handler_name))
        click.echo(f"{handler_name}: broken again")
    else:
        state.set(fixed_key(handler_name), "1")
        click.echo(f"{handler_name}: fixed (replay its dead letters now)")
