"""Shared by the scenarios: an own broker, medians, and writing results."""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.embedded import EmbeddedServer, start_server

RESULTS_DIR = Path(__file__).parent / "results"


@contextmanager
def own_broker() -> Iterator[EmbeddedServer]:
    """A Redis-protocol server of the benchmark's own, on a free port."""
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        server = start_server(Path(tmp), persist=False)
        try:
            yield server
        finally:
            server.stop()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def write_results(scenario: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {"scenario": scenario, "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"python": platform.python_version(), "cpus": _cpus()}, **data}
    path = RESULTS_DIR / f"{scenario}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _cpus() -> int:
    import os

    return os.cpu_count() or 0
