"""Long-running processes: a tier worker, the HTTP API, the local stack."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import click

from pipeline.cli.base import EXIT_CONFIG, cli, fail_config, runtime
from pipeline.errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # where --insecure-local may bind
GENERATED_TOKEN_BYTES = 32  # entropy of the token --insecure-local makes for one run


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--tier", required=True, help="Tier whose queue this worker consumes.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(tier: str, celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker for one tier; extra arguments go to `celery worker`.

    A gevent tier's worker (or one given `-P gevent`) starts again in a fresh
    interpreter that monkey-patches the standard library before importing anything.
    """
    try:
        from pipeline.app import app
    except ConfigError as exc:
        fail_config(exc)
    from pipeline.core.pools import GEVENT_BOOT, GEVENT_EXTRA, cli_pool, gevent_installed, green
    from pipeline.worker.bootstep import worker_argv
    from pipeline.worker.runtime import runtime_for

    settings = runtime_for(app).settings
    if tier not in settings.tiers:
        raise click.BadParameter(f"unknown tier {tier!r} (tiers: {', '.join(settings.tiers)})",
                                 param_hint="--tier")
    pool = cli_pool(celery_args) or settings.tier(tier).pool
    if pool == "gevent" and not green():
        if not gevent_installed():
            click.echo(f"error: tier {tier!r} runs the gevent pool but gevent is not "
                       f"installed: pip install '{GEVENT_EXTRA}'", err=True)
            sys.exit(EXIT_CONFIG)
        os.execv(sys.executable, [sys.executable, "-c", GEVENT_BOOT, "worker", "--tier", tier,
                                  *celery_args])
    app.conf.worker_send_task_events = settings.tier(tier).task_events
    app.worker_main(worker_argv(settings, tier, celery_args))



@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--insecure-local", is_flag=True,
              help="Local development without a configured token: bind loopback only and "
                   "generate a token for this run, printed once. Authentication stays on.")
def serve(host: str, port: int, insecure_local: bool) -> None:
    """Serve the HTTP ingest API (bearer tokens: PIPELINE_API_TOKEN, PIPELINE_API_TOKENS)."""
    import uvicorn

    from pipeline.core.tokens import DEFAULT_TOKEN_NAME, TOKEN_HINT, Credential, credentials
    from pipeline.core.webhooks import webhook_keys
    from pipeline.http.api import create_api

    if insecure_local and host not in LOOPBACK_HOSTS:
        click.echo(f"error: --insecure-local binds loopback only, not {host!r}", err=True)
        sys.exit(EXIT_CONFIG)
    rt = runtime()
    creds, problems = credentials(rt.settings)
    problems += webhook_keys(rt.settings)[1]
    if problems:
        fail_config(ConfigError(problems))
    if not creds:
        if not insecure_local:
            click.echo("error: no API token; refusing to serve without authentication. Set "
                       f"PIPELINE_API_TOKEN ({TOKEN_HINT}), or use --insecure-local for a "
                       "loopback-only dev server with a token generated for this run",
                       err=True)
            sys.exit(EXIT_CONFIG)
        generated = secrets.token_urlsafe(GENERATED_TOKEN_BYTES)
        creds = [Credential(DEFAULT_TOKEN_NAME, generated)]
        click.secho(f"--insecure-local: no token configured; this run's token (every scope, "
                    f"loopback only):\n  PIPELINE_API_TOKEN={generated}", fg="yellow",
                    err=True)
    api = create_api(rt, credentials=creds)
    from pipeline.core.logs import configure

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
    from pipeline.local.stack import run_stack

    sys.exit(run_stack(config_file=config_file, with_demo=with_demo, state_dir=state_dir))

