"""Settings: a TOML file layered over the built-in default, then the environment.

Precedence, highest first: keyword arguments, ``PIPELINE_*`` variables (nested with
``__``, e.g. ``PIPELINE_TIERS__BULK__CONCURRENCY=8``; lists as JSON), the file named
by ``PIPELINE_CONFIG``, the built-in ``default.toml``. A file that declares ``tiers``
replaces the built-in tiers and rules rather than merging with them.

:func:`load_settings` raises :class:`~pipeline.errors.ConfigError` naming every
offending setting, its value and where it came from; :func:`check_settings` adds
the cross-field checks that ``pipeline config check`` reports.

The pieces live in their own modules: the model in :mod:`pipeline.config.model`, the
TOML layers in :mod:`pipeline.config.toml`, the cross-field checks in
:mod:`pipeline.config.checks`. This module loads them into one :class:`Settings`
and traces a bad value back to the layer it came from.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import pydantic
from pydantic_settings import SettingsError

from pipeline.config.checks import check_settings
from pipeline.config.model import ENV_PREFIX, SECRET_FIELDS, BreakerConfig, Settings
from pipeline.config.toml import CONFIG_ENV
from pipeline.core.tiers import Rule, TierConfig
from pipeline.core.tokens import SECRET_MASK, ApiToken
from pipeline.errors import ConfigError, FieldProblem

__all__ = ["CONFIG_ENV", "Settings", "check_settings", "load_settings"]

SUGGEST_CUTOFF = 0.75  # difflib similarity above which an unknown key gets a suggestion


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (else ``$PIPELINE_CONFIG``), the environment and defaults."""
    previous = os.environ.get(CONFIG_ENV)
    if path is not None:
        os.environ[CONFIG_ENV] = str(path)
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise ConfigError(_problems(exc, set(overrides))) from None
    except SettingsError as exc:  # an env value that should be JSON (a list, a table) is not
        cause = exc.__cause__ or exc
        raise ConfigError([_env_problem(str(exc), cause)]) from None
    finally:
        if path is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous


def _problems(exc: pydantic.ValidationError, arguments: set[str]) -> list[FieldProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        hint = _did_you_mean(loc) if err["type"] == "extra_forbidden" else ""
        problems.append(FieldProblem.of_pydantic(err, _shown(loc, err.get("input")),
                                                 f"{hint} ({_source_of(loc, arguments)})"))
    return problems


def _did_you_mean(loc: list[str]) -> str:
    """``; did you mean `max_retries`?`` for a key close to one its table knows."""
    tables: dict[str, type[pydantic.BaseModel]] = {
        "tiers": TierConfig, "breakers": BreakerConfig, "api_tokens": ApiToken, "rules": Rule}
    model = tables.get(loc[0], Settings) if len(loc) > 1 else Settings
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1,
                                      cutoff=SUGGEST_CUTOFF)
    if close:
        return f"; did you mean `{close[0]}`?"
    if model is Settings:  # a tier's setting written at the top level
        close = difflib.get_close_matches(loc[-1], list(TierConfig.model_fields), n=1,
                                          cutoff=SUGGEST_CUTOFF)
        if close:
            return f"; did you mean `{close[0]}` in a [tiers.NAME] table?"
    return ""


def _shown(loc: list[str], value: object) -> object:
    """A bad value as a message may quote it: a token (or what holds one) never."""
    if loc and loc[0] in SECRET_FIELDS and (len(loc) <= 2 or loc[-1] == "token"):
        return SECRET_MASK
    return value


def _env_problem(text: str, cause: BaseException) -> FieldProblem:
    """pydantic-settings says 'error parsing value for field "x" from source "Y"'."""
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else "<env>"
    name = ENV_PREFIX + field.upper()
    value = SECRET_MASK if field in SECRET_FIELDS else os.environ.get(name)
    return FieldProblem(field, value, f"not valid JSON ({cause}) (from env {name})")


def _source_of(loc: list[str], arguments: set[str]) -> str:
    """Where a setting came from: an argument, an environment variable, the file or the default."""
    if loc and loc[0] in arguments:
        return "from argument"
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:depth]).upper()
        if name in os.environ:
            return f"from env {name}"
    path = os.environ.get(CONFIG_ENV)
    if path:
        return f"from {path}"
    return "from built-in default"
