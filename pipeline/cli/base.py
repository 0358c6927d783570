"""The root ``pipeline`` command group and what its subcommands share.

Exit codes: 0 success; 1 some input rejected (``send``) or a check failed;
2 bad usage or bad configuration; 3 broker or state store unreachable.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pipeline.config.discovery import DEFAULT_STATE_DIR, STACK_PID_KEY, adopt_stack
from pipeline.errors import BrokerUnavailable, ConfigError

if TYPE_CHECKING:
    from pipeline.worker.runtime import Runtime

__all__ = ["EXIT_BROKER", "EXIT_CONFIG", "EXIT_REJECTED", "cli", "fail_config",
           "note_if_no_workers", "progress_bar", "runtime"]

EXIT_REJECTED = 1  # some events were rejected, or a check failed
EXIT_CONFIG = 2  # bad usage or configuration
EXIT_BROKER = 3  # broker or state store unreachable


_state_dir: list[Path] = [DEFAULT_STATE_DIR]  # set by the group's --state-dir


def runtime() -> Runtime:
    """The default app's runtime (imports ``pipeline.app``, which reads the config).
    With no broker configured, the stack ``pipeline up`` runs from ``--state-dir``
    is used, and said so on stderr."""
    from pipeline.config.load import load_settings
    from pipeline.core.redisurl import redact

    try:
        configured = load_settings().broker_url is not None
    except ConfigError as exc:
        fail_config(exc)
    try:
        adopted = adopt_stack(_state_dir[0], configured)
    except ConfigError as exc:  # a stale stack.env: refuse rather than read another Redis
        fail_config(exc)
    if adopted is not None:
        path, values = adopted
        click.echo(f"using the stack `pipeline up` (pid {values.get(STACK_PID_KEY, '?')}) runs "
                   f"from {path}: broker {redact(values.get('PIPELINE_BROKER_URL', '?'))}",
                   err=True)
    try:
        from pipeline.app import app
    except ConfigError as exc:
        fail_config(exc)
    from pipeline.worker.runtime import runtime_for

    return runtime_for(app)


def note_if_no_workers(rt: Runtime) -> None:
    """On stderr, which broker was read when no worker of any tier is seen there: a
    command pointed at the wrong Redis would otherwise just report an idle pipeline."""
    from pipeline.core.redisurl import redact
    from pipeline.observe.gauges import read_snapshot

    try:
        snap = read_snapshot(rt)
    except BrokerUnavailable:
        return
    if not any(t.workers_online for t in snap.tiers):
        click.echo(f"note: no workers on broker {redact(rt.settings.effective_broker_url)}; "
                   f"a stack started with `pipeline up` is found from its state directory "
                   f"(here {_state_dir[0]}; --state-dir, or source its stack.env)", err=True)


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
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              envvar="PIPELINE_STATE_DIR", default=DEFAULT_STATE_DIR, show_default=True,
              help="State directory of a `pipeline up` stack to use when no broker is "
                   "configured.")
def cli(state_dir: Path) -> None:
    """Tiered, loss-free event processing on Celery."""
    _state_dir[0] = state_dir
