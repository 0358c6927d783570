"""Browser tests: Playwright driving Debian's Chromium (no browser download).

``PIPELINE_TEST_CHROMIUM`` names another binary. Without Chromium or Playwright the
tests are skipped with the reason, and fail instead under ``CI``, where ``.ci/run``
installs Chromium (as the RabbitMQ tests fail there without their broker).
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM_ENV = "PIPELINE_TEST_CHROMIUM"  # a Chromium binary other than `chromium` on PATH


def chromium() -> str:
    """Chromium's path; skip (fail under ``CI``) without one or without Playwright."""
    path = shutil.which(os.environ.get(CHROMIUM_ENV, "chromium"))
    missing = None if path else "no chromium on PATH (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"browser test under CI: {missing}")
        pytest.skip(missing)
    assert path is not None
    return path
