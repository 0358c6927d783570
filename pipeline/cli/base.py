"""The root ``pipeline`` command group and what its subcommands share.

Exit codes: 0 success; 1 some input rejected (``send``) or a check failed;
2 bad usage or bad configuration; 3 broker or state store unreachable.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, NoReturn

import click

from pipeline.errors import ConfigError

__all__ = ["EXIT_BROKER", "EXIT_CONFIG", "EXIT_REJECTED", "cli", "fail_config", "progress_bar",
           "runtime"]

EXIT_REJECTED = 1  # some events were rejected, or a check failed
EXIT_CONFIG = 2  # bad usage or configuration
EXIT_BROKER = 3  # broker or state store unreachable


def runtime() -> Any:
    """The default app's runtime (imports ``pipeline.app``, which reads the config)."""
    try:
        from pipeline.app import app
    except ConfigError as exc:
        fail_config(exc)
    from pipeline.runtime import runtime_for

    return runtime_for(app)


def fail_config(exc: ConfigError) -> NoReturn:
    for problem in exc.problems:
        click.echo(f"config error: {problem}", err=True)
    sys.exit(EXIT_CONFIG)


class _NoBar:
    def update(self, n: int) -> None:
        pass


def progress_bar(length: int, label: str) -> Any:
    """A click progress bar on stderr when it is a terminal; a silent stand-in otherwise."""
    if not sys.stderr.isatty():
        return contextlib.nullcontext(_NoBar())
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=not length)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Tiered, loss-free event processing on Celery."""
