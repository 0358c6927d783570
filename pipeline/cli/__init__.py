"""``pipeline``: the command line. One module per group of verbs."""

from __future__ import annotations

from pipeline.cli import breaker, config, demo, dlq, observe, run, send  # noqa: F401  (register commands)
from pipeline.cli.base import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="pipeline")
