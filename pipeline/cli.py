"""``pipeline``: the command line.

Exit codes: 0 success; 1 some input rejected (``send``); 2 bad usage or bad
configuration; 3 broker or state store unreachable.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from pipeline.config import check_settings, load_settings
from pipeline.errors import BrokerUnavailable, ConfigError, FieldProblem

__all__ = ["main"]

EXIT_REJECTED = 1  # some events were rejected
EXIT_CONFIG = 2  # bad usage or configuration
EXIT_BROKER = 3  # broker or state store unreachable
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # where --insecure-local may bind


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
    """Publish NDJSON events from SOURCE (a file, or - for stdin) with publish_many."""
    try:
        rt = _runtime()
    except ConfigError as exc:
        _fail_config(exc)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    rejected: list[dict[str, Any]] = []
    chunk_size = rt.settings.publish_batch_size
    numbered = ((n, line) for n, line in enumerate(source, start=1) if line.strip())
    with _progress(source) as bar:
        while chunk := list(itertools.islice(numbered, chunk_size)):
            try:
                results = rt.publisher.publish_many([line for _, line in chunk])
            except BrokerUnavailable as exc:
                click.echo(f"\nerror: {exc}; {counts['accepted']} accepted before it, "
                           f"line {chunk[0][0]} and later were not sent", err=True)
                sys.exit(EXIT_BROKER)
            for (number, _), result in zip(chunk, results, strict=True):
                counts[result.outcome] += 1
                if result.outcome == "rejected":
                    reasons[result.reason or "?"] += 1
                    rejected.append({"line": number, "reason": result.reason,
                                     "errors": result.errors})
            bar.update(sum(len(line) for _, line in chunk))
    summary = {"accepted": counts["accepted"], "duplicate": counts["duplicate"],
               "rejected": counts["rejected"], "rejected_by_reason": dict(reasons),
               "rejected_lines": rejected}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        by_reason = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
        click.echo(f"accepted {counts['accepted']}, duplicate {counts['duplicate']}, "
                   f"rejected {counts['rejected']}" + (f" ({by_reason})" if by_reason else ""))
        for item in rejected:
            for err in item["errors"] or [{"field": "-", "value": None,
                                           "message": item["reason"]}]:
                click.echo(f"  line {item['line']}: {err['field']}={err['value']!r}: "
                           f"{err['message']}")
    sys.exit(EXIT_REJECTED if rejected else 0)


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _progress(source: IO[bytes]) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal, sized by the file when it has one."""
    if not sys.stderr.isatty():
        yield _NoBar()
        return
    try:
        size = os.fstat(source.fileno()).st_size or None
    except (OSError, ValueError):
        size = None
    with click.progressbar(length=size or 0, label="sending", file=sys.stderr,
                           show_pos=size is None) as bar:
        yield bar


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--insecure-local", is_flag=True,
              help="Run WITHOUT authentication, bound to loopback only (local development).")
def serve(host: str, port: int, insecure_local: bool) -> None:
    """Serve the HTTP ingest API (bearer token from PIPELINE_API_TOKEN)."""
    import uvicorn

    from pipeline.api import create_api

    try:
        rt = _runtime()
    except ConfigError as exc:
        _fail_config(exc)
    secret = rt.settings.api_token
    if secret is None:
        if not insecure_local:
            click.echo("error: PIPELINE_API_TOKEN is not set; refusing to serve without "
                       "authentication (use --insecure-local for a loopback-only dev server)",
                       err=True)
            sys.exit(EXIT_CONFIG)
        if host not in LOOPBACK_HOSTS:
            click.echo(f"error: --insecure-local binds loopback only, not {host!r}", err=True)
            sys.exit(EXIT_CONFIG)
        click.secho("WARNING: serving WITHOUT AUTHENTICATION (--insecure-local); anyone on "
                    "this machine can publish events", fg="red", bold=True, err=True)
        logging.getLogger("pipeline.api").warning("serving without authentication")
    api = create_api(rt, token=secret.get_secret_value() if secret else None)
    uvicorn.run(api, host=host, port=port, log_level="info", access_log=False)


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
