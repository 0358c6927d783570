"""``pipeline``: the command line.

Exit codes: 0 success; 1 some input rejected (``send``); 2 bad usage or bad
configuration; 3 broker or state store unreachable.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import IO, Any

import click

from pipeline.config import check_settings, load_settings
from pipeline.errors import BrokerUnavailable, ConfigError, EventValidationError, FieldProblem

__all__ = ["main"]

EXIT_REJECTED = 1  # some events were rejected
EXIT_CONFIG = 2  # bad usage or configuration
EXIT_BROKER = 3  # broker or state store unreachable


def _runtime() -> Any:
    from pipeline.app import app
    from pipeline.runtime import runtime_for

    return runtime_for(app)


def _drop_none(value: Any) -> Any:
    """TOML has no null: unset optional settings are left out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _fail_config(exc: ConfigError) -> None:
    for problem in exc.problems:
        click.echo(f"config error: {problem}", err=True)
    sys.exit(EXIT_CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Tiered, loss-free event processing on Celery."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--tier", required=True, help="Tier whose queue this worker consumes.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(tier: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker for one tier; extra arguments go to `celery worker`."""
    try:
        from pipeline.app import app
    except ConfigError as exc:
        _fail_config(exc)
    from pipeline.runtime import runtime_for
    from pipeline.worker import worker_argv

    settings = runtime_for(app).settings
    if tier not in settings.tiers:
        raise click.BadParameter(f"unknown tier {tier!r} (tiers: {', '.join(settings.tiers)})",
                                 param_hint="--tier")
    app.worker_main(worker_argv(settings, tier, celery_args))


@cli.command()
@click.argument("source", type=click.File("rb"))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def send(source: IO[bytes], as_json: bool) -> None:
    """Publish NDJSON events from SOURCE (a file, or - for stdin)."""
    try:
        rt = _runtime()
    except ConfigError as exc:
        _fail_config(exc)
    accepted = 0
    rejected: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    for number, raw in enumerate(source, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            rt.publisher.publish(line)
            accepted += 1
        except EventValidationError as exc:
            reasons["invalid"] += 1
            rejected.append({"line": number, "reason": "invalid", "errors": exc.as_dicts()})
        except BrokerUnavailable as exc:
            click.echo(f"error: {exc}; {accepted} accepted before it, line {number} and "
                       "later were not sent", err=True)
            sys.exit(EXIT_BROKER)
    summary = {"accepted": accepted, "duplicate": 0, "rejected": sum(reasons.values()),
               "rejected_by_reason": dict(reasons), "rejected_lines": rejected}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"accepted {accepted}, rejected {summary['rejected']}")
        for item in rejected:
            for err in item["errors"]:
                click.echo(f"  line {item['line']}: {err['field']}={err['value']!r}: "
                           f"{err['message']}")
    sys.exit(EXIT_REJECTED if rejected else 0)


@cli.group()
def config() -> None:
    """Validate or print the configuration."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path | None) -> None:
    """Validate FILE (else $PIPELINE_CONFIG, else the built-in default)."""
    problems: list[FieldProblem]
    try:
        settings = load_settings(file)
        problems = check_settings(settings, import_handlers=True)
    except ConfigError as exc:
        problems = list(exc.problems)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(EXIT_CONFIG)
    click.echo(f"ok: {len(settings.tiers)} tiers, {len(settings.rules)} rules")


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML-like text.")
def config_show(as_json: bool) -> None:
    """Print the effective configuration (file, environment and defaults merged)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _fail_config(exc)
    data = settings.model_dump(mode="json")
    if as_json:
        data["effective_broker_url"] = settings.effective_broker_url
        data["effective_visibility_timeout_s"] = settings.visibility_timeout_s
        click.echo(json.dumps(data, indent=2))
        return
    import tomli_w

    click.echo(f"# effective broker: {settings.effective_broker_url}")
    click.echo(f"# effective visibility timeout: {settings.visibility_timeout_s:g}s")
    click.echo(tomli_w.dumps(_drop_none(data)))


@cli.group()
def dlq() -> None:
    """Inspect the dead-letter queue."""


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print records as a JSON array.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many.")
def dlq_list(as_json: bool, limit: int | None) -> None:
    """List dead-letter records, oldest first."""
    records = _runtime().dlq.records(limit)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    for r in records:
        click.echo(f"{r.last_failed_at:%Y-%m-%d %H:%M:%S}  {r.tier:<9} {r.reason.value:<18} "
                   f"{r.event.get('type', '?'):<20} {r.handler:<20} {r.exception}: "
                   f"{r.message[:60]}")
    click.echo(f"{len(records)} record(s)", err=True)


@cli.group()
def demo() -> None:
    """Demo handlers: account for a run."""


@demo.command("report")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--ids", "with_ids", is_flag=True, help="Include the processed event ids.")
def demo_report(as_json: bool, with_ids: bool) -> None:
    """How many demo events were processed, and how many effects ran twice."""
    from pipeline.demo import report

    result = report(_runtime().state, with_ids=with_ids)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"processed {result['processed']}, duplicate effects "
                   f"{result['duplicate_effects']}")


@cli.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML config (else $PIPELINE_CONFIG, else the built-in default).")
@click.option("--demo", "with_demo", is_flag=True, help="Load the demo handlers and send a mix.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".pipeline-state"), show_default=True,
              help="Where the embedded broker keeps its data and logs.")
def up(config_file: str | None, with_demo: bool, state_dir: Path) -> None:
    """Run the pipeline locally: a broker if none is configured, one worker per tier."""
    from pipeline.stack import run_stack

    sys.exit(run_stack(config_file=config_file, with_demo=with_demo, state_dir=state_dir))


def main() -> None:
    cli(prog_name="pipeline")
