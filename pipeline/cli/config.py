"""``pipeline config check|show``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from pipeline.cli.base import EXIT_CONFIG, cli, fail_config
from pipeline.config.checks import config_warnings
from pipeline.config.load import CONFIG_ENV, check_settings, load_settings
from pipeline.config.toml import read_default_toml, read_toml
from pipeline.core.redisurl import MASK, mask_urls, redact
from pipeline.core.tokens import credentials, token_notes
from pipeline.core.webhooks import webhook_keys
from pipeline.dlq.sealing import key_problems
from pipeline.errors import ConfigError, FieldProblem


def _drop_none(value: Any) -> Any:
    """TOML has no null: unset optional settings are left out."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value



def _masked(value: Any, key: str = "") -> Any:
    """What ``config show`` prints: URLs without passwords, password options masked
    (tokens are masked by the model already)."""
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, key) for v in value]
    if isinstance(value, str) and "password" in key.lower():
        return MASK
    return mask_urls(value) if isinstance(value, str) else value


@cli.group()
def config() -> None:
    """Validate or print the configuration."""


@config.command("check")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def config_check(file: Path | None) -> None:
    """Validate FILE (else $PIPELINE_CONFIG, else the built-in default)."""
    problems: list[FieldProblem]
    warnings: list[FieldProblem] = []
    notes: list[str] = []
    try:
        settings = load_settings(file)
        problems = check_settings(settings, import_handlers=True)
        problems += credentials(settings)[1]  # token_env secrets, as `pipeline serve` reads them
        problems += webhook_keys(settings)[1]  # webhook secrets, the same way
        problems += key_problems(os.environ)  # PIPELINE_DLQ_KEYS, as every process reads it
        notes = token_notes(settings)
        path = file or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
        warnings = config_warnings(settings, read_toml(path) if path else None,
                                   read_default_toml())
    except ConfigError as exc:
        problems = list(exc.problems)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if problems:
        sys.exit(EXIT_CONFIG)
    click.echo(f"ok: {len(settings.tiers)} tiers ({', '.join(settings.tiers)}), "
               f"{len(settings.rules)} rules"
               + (f", {len(warnings)} warning(s)" if warnings else ""))


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of TOML-like text.")
def config_show(as_json: bool) -> None:
    """Print the effective configuration (file, environment and defaults merged)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail_config(exc)
    data = _masked(settings.model_dump(mode="json"))
    if as_json:
        data["effective_broker_url"] = redact(settings.effective_broker_url)
        data["effective_visibility_timeout_s"] = settings.visibility_timeout_s
        click.echo(json.dumps(data, indent=2))
        return
    import tomli_w

    click.echo(f"# effective broker: {redact(settings.effective_broker_url)}")
    click.echo(f"# effective visibility timeout: {settings.visibility_timeout_s:g}s")
    click.echo(tomli_w.dumps(_drop_none(data)))


