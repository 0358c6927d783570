"""Long-running processes: a tier worker, the HTTP API, the local stack."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.cli.base import EXIT_CONFIG, cli, fail_config, runtime
from pipeline.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # where --insecure-local may bind


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--tier", required=True, help="Tier whose queue this worker consumes.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(tier: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker for one tier; extra arguments go to `celery worker`."""
    try:
        from pipeline.app import app
    except ConfigError as exc:
        fail_config(exc)
    from pipeline.runtime import runtime_for
    from pipeline.worker import worker_argv

    settings = runtime_for(app).settings
    if tier not in settings.tiers:
        raise click.BadParameter(f"unknown tier {tier!r} (tiers: {', '.join(settings.tiers)})",
                                 param_hint="--tier")
    app.conf.worker_send_task_events = settings.tier(tier).task_events
    app.worker_main(worker_argv(settings, tier, celery_args))



@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--insecure-local", is_flag=True,
              help="Run WITHOUT authentication, bound to loopback only (local development).")
def serve(host: str, port: int, insecure_local: bool) -> None:
    """Serve the HTTP ingest API (bearer token from PIPELINE_API_TOKEN)."""
    import uvicorn

    from pipeline.api import create_api

    rt = runtime()
    secret = rt.settings.api_token
    named = {name: value.get_secret_value() for name, value in rt.settings.api_tokens.items()}
    if secret is None and not named:
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
    api = create_api(rt, token=secret.get_secret_value() if secret else None, tokens=named)
    from pipeline.logs import configure

    configure()  # JSON lines in production, readable on a terminal, as the workers
    uvicorn.run(api, host=host, port=port, log_config=None, access_log=False)



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

