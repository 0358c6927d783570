"""A broker SIGKILLed under load (AOF ``appendfsync always``) and restarted on its data:
every event a publish accepted is handled once; nothing accepted is lost.

The broker is this test's own server on a free port; handler runs are counted on
the suite's server (``FAULT_EFFECTS_URL``), which stays up.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pipeline.errors import BrokerUnavailable
from pipeline.local.embedded import EmbeddedServer, start_server
from tests.integration import fault_handlers
from tests.integration.support import Stack, wait_for
from tests.integration.test_reliable_fetch import FAULT_TOML

BROKER_DOWN_S = 3.0  # how long the broker stays dead before it is restarted


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = start_server(tmp_path / "broker", persist=True, appendfsync="always")
    yield server
    server.stop()


def test_broker_sigkill_under_load_loses_and_duplicates_nothing_accepted(
    broker: EmbeddedServer, redis_url: str, tmp_path: Path,
) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text(FAULT_TOML.format(p=""))
    os.environ["FAULT_EFFECTS_URL"] = redis_url
    stack = Stack(broker.url, config, tmp_path, env_extra={"FAULT_EFFECTS_URL": redis_url})
    try:
        stack.start_workers("critical", "standard")
        accepted: list[str] = []
        restarted: EmbeddedServer | None = None
        killed_at = time.monotonic() + 2.0
        deadline = killed_at + BROKER_DOWN_S + 4.0
        while time.monotonic() < deadline:
            if restarted is None and time.monotonic() >= killed_at and broker.alive():
                broker.kill()
            if (restarted is None and not broker.alive()
                    and time.monotonic() >= killed_at + BROKER_DOWN_S):
                restarted = start_server(broker.data_dir, port=broker.port, persist=True,
                                         appendfsync="always")
            events: list[dict[str, Any]] = [
                {"id": str(uuid.uuid4()), "type": "fault.record", "source": "crash",
                 "tier": tier, "payload": {}} for tier in ("critical", "standard") * 10]
            try:
                results = stack.rt.publisher.publish_many(events)
            except BrokerUnavailable:
                results = []
            accepted += [r.id for r in results if r.outcome == "accepted" and r.id]
            time.sleep(0.05)
        assert restarted is not None
        broker.process = restarted.process  # the fixture stops the restarted server

        def runs(event_id: str) -> int:
            return int(fault_handlers.effects().llen(fault_handlers.runs_key(event_id)))

        try:
            wait_for(lambda: all(runs(i) >= 1 for i in accepted), 120,
                     f"all {len(accepted)} accepted events handled", 0.5)
        except AssertionError:
            missing = [i for i in accepted if runs(i) == 0]
            raise AssertionError(f"{len(missing)} of {len(accepted)} never ran; broker: "
                                 f"{_where(stack)}") from None
        time.sleep(5)
        assert [i for i in accepted if runs(i) != 1] == []
        assert stack.rt.dlq.records() == []
    finally:
        stack.stop()


def _where(stack: Stack) -> dict[str, int]:
    """Where work sits on the broker, for a failure message."""
    state = stack.state
    found = {cast(bytes, key).decode(): int(state.llen(key)) for key in state.keys("*critical*")
             + state.keys("*standard*") if state.type(key) == b"list"}
    found["unacked"] = int(state.hlen("unacked"))
    found["retries"] = sum(int(state.zcard(k)) for k in state.keys("pipeline:retry:*"))
    found["inflight"] = sum(int(state.hlen(k)) for k in state.keys("pipeline:inflight:*"))
    found["consumers"] = int(state.zcard("pipeline:consumers"))
    return found
