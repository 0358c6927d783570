"""The TOML layers of the settings: the built-in ``default.toml``, the file named
by ``PIPELINE_CONFIG`` over it.

A file that declares ``tiers`` replaces the built-in tiers and rules rather than
merging with them. :class:`TomlLayers` is the pydantic-settings source that
:class:`~pipeline.config.model.Settings` reads below the environment; a missing or
malformed file is a :class:`~pipeline.errors.ConfigError` naming it.
"""

from __future__ import annotations

import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

from pipeline.errors import ConfigError, FieldProblem

__all__ = ["CONFIG_ENV", "TomlLayers", "layer", "read_default_toml", "read_toml"]

CONFIG_ENV = "PIPELINE_CONFIG"  # names the TOML file to layer over the default


class TomlLayers(PydanticBaseSettingsSource):
    """The built-in ``default.toml`` with the ``PIPELINE_CONFIG`` file over it."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # whole-document source: see __call__

    def __call__(self) -> dict[str, Any]:
        data = read_default_toml()
        path = os.environ.get(CONFIG_ENV)
        if path:
            data = layer(data, read_toml(Path(path)))
        return data


def read_default_toml() -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("default.toml").read_text()
    return tomllib.loads(text)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([FieldProblem(CONFIG_ENV, str(path), "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([FieldProblem(CONFIG_ENV, str(path), f"not valid TOML: {exc}")]) from None


def layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; declaring ``tiers`` replaces the base tiers and rules."""
    merged = dict(base)
    if "tiers" in top:
        merged.pop("rules", None)
    merged.update(top)
    return merged
