"""The exporter reads every process's metrics files; one a killed process left half-made
must not fail the scrape (a real prometheus_client file next to an empty one)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from pipeline.observe.exporter import build_registry, scrape


def _counter_file(path: Path, value: float) -> None:
    """What a worker process writes for ``pipeline_demo_total`` in multiprocess mode."""
    d: Any = MmapedDict(str(path))  # type: ignore[no-untyped-call]  # untyped methods
    d.write_value(mmap_key("pipeline_demo", "pipeline_demo_total", [], [], "demo"), value, 0.0)
    d.close()


def test_an_empty_metrics_file_left_by_a_killed_process_is_skipped_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    _counter_file(tmp_path / "counter_101.db", 3.0)
    _counter_file(tmp_path / "counter_102.db", 4.0)
    (tmp_path / "histogram_103.db").touch()  # killed between creating and sizing it
    registry = build_registry(None)
    with caplog.at_level(logging.WARNING, logger="pipeline.observe.exporter"):
        for _ in range(2):  # warned about once, skipped on every scrape
            text = scrape(registry).decode()
    totals = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "pipeline_demo_total"]
    assert totals == [7.0]  # both live processes' counts, summed
    warnings = [r.getMessage() for r in caplog.records if "histogram_103.db" in r.getMessage()]
    assert len(warnings) == 1
