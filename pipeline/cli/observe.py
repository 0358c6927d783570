"""Watching the pipeline: ``pipeline status``, ``pipeline exporter``, ``pipeline flower``."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from pipeline.cli.base import EXIT_BROKER, EXIT_CONFIG, cli, note_if_no_workers, runtime
from pipeline.errors import BrokerUnavailable

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # where --insecure-local may bind


@cli.command()
@click.option("--json", "as_json", is_flag=True,
              help="JSON (with --watch: one compact document per line).")
@click.option("--watch", type=click.FloatRange(min=0.5), default=None, metavar="SECONDS",
              help="Refresh every SECONDS until Ctrl-C.")
def status(as_json: bool, watch: float | None) -> None:
    """Per tier: depth, oldest age vs SLO, in flight, retries, rates, workers; the DLQ.

    Exit code 1 when any tier's oldest message is older than its slo_s, 3 when
    the broker cannot be read.
    """
    from pipeline.observe.status import EXIT_LATE, build_report, render_text

    rt = runtime()
    code = 0
    try:
        while True:
            try:
                report = build_report(rt)
            except BrokerUnavailable as exc:
                click.echo(f"error: {exc}", err=True)
                sys.exit(EXIT_BROKER)
            code = EXIT_LATE if report["late"] else 0
            if watch is None:
                note_if_no_workers(rt)
            if as_json:
                text = json.dumps(report, indent=None if watch else 2)
            else:
                text = render_text(report)
                if watch is not None and sys.stdout.isatty():
                    click.clear()
            click.echo(text)
            if watch is None:
                break
            time.sleep(watch)
    except KeyboardInterrupt:
        pass
    sys.exit(code)


@cli.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="Interface to bind.")
@click.option("--port", default=9808, show_default=True, type=click.IntRange(1, 65535))
def exporter(host: str, port: int) -> None:
    """Serve Prometheus metrics: broker gauges read per scrape, plus the workers'
    recorded metrics when PROMETHEUS_MULTIPROC_DIR is set."""
    from pipeline.core import logs
    from pipeline.observe.exporter import serve
    from pipeline.observe.metrics import MULTIPROC_ENV, multiprocess_dir

    where = multiprocess_dir()
    if where and not os.path.isdir(where):
        click.echo(f"error: {MULTIPROC_ENV}={where!r} is not a directory", err=True)
        sys.exit(EXIT_CONFIG)
    logs.configure()
    serve(runtime(), host=host, port=port)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--insecure-local", is_flag=True,
              help="Run WITHOUT authentication, bound to loopback only (local development).")
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(host: str, port: int, insecure_local: bool, flower_args: tuple[str, ...]) -> None:
    """Start Flower for the pipeline's app, with authentication.

    Basic auth from PIPELINE_FLOWER_BASIC_AUTH ("user:password[,user2:password2]"),
    or Flower's OAuth options passed through (--auth=REGEX --auth_provider=...).
    Other arguments go to Flower (--url_prefix=..., --broker_api=... on RabbitMQ).
    """
    from pipeline.core import logs
    from pipeline.observe.flower import (
        BASIC_AUTH_ENV,
        auth_mode,
        flower_argv,
        list_every_queue,
        prepare_environment,
    )

    mode = auth_mode(os.environ, flower_args)
    if mode is None:
        if not insecure_local:
            click.echo(f"error: no authentication for Flower: set {BASIC_AUTH_ENV}="
                       "user:password, or pass Flower's OAuth options (--auth=... "
                       "--auth_provider=...); --insecure-local runs a loopback-only dev "
                       "server without it", err=True)
            sys.exit(EXIT_CONFIG)
        if host not in LOOPBACK_HOSTS or any(a.startswith("--address") for a in flower_args):
            click.echo(f"error: --insecure-local binds loopback only, not {host!r}", err=True)
            sys.exit(EXIT_CONFIG)
        click.secho("WARNING: Flower WITHOUT AUTHENTICATION (--insecure-local); anyone on "
                    "this machine can see events and revoke or restart tasks",
                    fg="red", bold=True, err=True)
    try:
        prepare_environment(basic_auth=os.environ.get(BASIC_AUTH_ENV),
                            insecure_local=mode is None)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    rt = runtime()
    settings = rt.settings
    logs.configure()
    list_every_queue([*(settings.queue_for(t) for t in settings.tiers),
                      settings.dead_letter_queue])
    sys.exit(rt.app.start(flower_argv(host=host, port=port, extra=flower_args)) or 0)
