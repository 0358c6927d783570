"""Unit-test isolation: the developer's ``PIPELINE_*`` environment never leaks in."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("PIPELINE_"):
            monkeypatch.delenv(name)
