"""What ``pipeline up`` tells: the stack's URLs, ports and credentials.

:class:`Endpoints` collects them while the stack is composed; they are written
to ``<state-dir>/stack.env`` (shell-sourceable, mode 0600: it holds the API token
and the Flower password) so other ``pipeline`` commands can be pointed at the
stack, and shown once in the banner, credentials generated for this run included.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.redisurl import redact
from pipeline.local.demotraffic import DEMO_DB, DOOMED_MAX

__all__ = ["Endpoints", "banner", "write_env_file"]

STACK_ENV_MODE = 0o600  # stack.env holds the API token and Flower password
DEMO_ON = (f"sending reward grants, game updates, interactions and analytics (all four "
           f"tiers) and {DOOMED_MAX} events that fail for good; in db {DEMO_DB} of the "
           f"embedded broker, apart from stacks without --demo")


@dataclass
class Endpoints:
    """What the banner and stack.env tell: URLs, ports and credentials."""

    broker: str
    values: dict[str, str] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)  # names of generated credentials


def write_env_file(path: Path, env: dict[str, str], endpoints: Endpoints) -> None:
    """Shell-sourceable settings of this stack, readable by its owner only."""
    values = {"PIPELINE_BROKER_URL": endpoints.broker, "PIPELINE_UP_PID": str(os.getpid())}
    for key in ("PIPELINE_CONFIG", "PIPELINE_HANDLER_MODULES"):
        if env.get(key):
            values[key] = env[key]
    values.update(endpoints.values)
    lines = [f"# written by `pipeline up` (pid {os.getpid()}); removed when it stops.",
             f"# Use it: set -a; . {shlex.quote(str(path))}; set +a; pipeline dlq list",
             *(f"{key}={shlex.quote(value)}" for key, value in values.items())]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, STACK_ENV_MODE)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), STACK_ENV_MODE)  # an older file kept its old mode
        handle.write("\n".join(lines) + "\n")


def banner(endpoints: Endpoints, workers: list[str], log_dir: Path, env_file: Path, *,
           embedded: bool, with_demo: bool, demo_loaded: bool) -> str:
    """The lines printed once the stack is up: where everything is and how to use it."""
    values = endpoints.values
    source = f"set -a; . {shlex.quote(str(env_file))}; set +a"
    event = '{"type": "demo.ok", "source": "cli"}'
    lines = [
        "pipeline is up",
        f"  broker:   {redact(endpoints.broker)}"
        + (f"  (embedded; data in {log_dir.parent / 'broker'})" if embedded else ""),
        f"  workers:  {', '.join(workers)}",
    ]
    if "PIPELINE_API_URL" in values:
        lines.append(f"  API:      {values['PIPELINE_API_URL']}  (docs: "
                     f"{values['PIPELINE_API_URL']}/docs)")
        lines.append(f"  console:  {values['PIPELINE_API_URL']}/console  (DLQ in the browser; "
                     "log in with PIPELINE_API_TOKEN)")
    if "PIPELINE_FLOWER_URL" in values:
        lines.append(f"  Flower:   {values['PIPELINE_FLOWER_URL']}")
    if "PIPELINE_EXPORTER_URL" in values:
        lines.append(f"  metrics:  {values['PIPELINE_EXPORTER_URL']}")
    for name in endpoints.generated:  # printed here once; also in stack.env (0600)
        lines.append(f"  {name}={values[name]}  (generated for this run)")
    lines += [
        f"  env:      {env_file}  (mode 600; removed on stop)",
        f"  logs:     {log_dir}",
        "  send a first event:",
        f"    {source}",
    ]
    if "PIPELINE_API_URL" in values:
        lines.append(f"    curl -s -X POST \"$PIPELINE_API_URL/events\" -H \"Authorization: Bearer "
                     f"$PIPELINE_API_TOKEN\" -H 'Content-Type: application/json' -d '{event}'")
    lines.append(f"    echo '{event}' | pipeline send -")
    if not demo_loaded:
        lines.append("    (no demo handlers loaded: without --demo or handlers of your own in "
                     "handler_modules, it is dead-lettered as no_handler)")
    lines += [
        "    pipeline dlq list",
        f"  demo:     {DEMO_ON if with_demo else 'off (use --demo)'}",
        "  stop:     Ctrl-C",
    ]
    return "\n".join(lines)
