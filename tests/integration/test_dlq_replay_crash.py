"""Lossless replay: the broker is killed in the middle of replaying 1,000 records.

No worker consumes while the broker dies: kombu's Redis transport pops a message
(BRPOP) and records it as unacknowledged in a second command, so a broker crash
between the two can lose a message being *consumed* — a transport gap documented
in docs/design.md, separate from what this test proves about the replay itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.core.retry import Reason
from pipeline.demo import fixed_key, report
from pipeline.dlq.record import DeadLetterRecord
from pipeline.local.embedded import EmbeddedServer, start_server
from pipeline.messages.taskids import task_id_for
from tests.integration.support import Stack, wait_for, write_config

RECORDS = 1000  # records replayed while the broker dies
VISIBILITY_TIMEOUT_S = 8.0  # in-flight messages of the killed broker come back after this


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[list[EmbeddedServer]]:
    holder = [start_server(tmp_path / "broker", persist=True)]
    yield holder
    holder[0].stop()


def dead_letter(event_id: str) -> DeadLetterRecord:
    now = datetime.now(UTC)
    return DeadLetterRecord(
        id=str(uuid.uuid4()), event={"id": event_id, "type": "demo.fail", "source": "crash",
                                     "payload": {}},
        tier="standard", handler="demo.fail", reason=Reason.RETRIES_EXHAUSTED, attempts=3,
        exception="pipeline.demo.DemoTransientError", message="demo.fail always fails",
        traceback="Traceback ...", first_failed_at=now, last_failed_at=now, worker="test",
        task_id=task_id_for(event_id, "demo.fail"), queue="standard")


def test_broker_killed_mid_replay_loses_and_duplicates_nothing(
    own_broker: list[EmbeddedServer], tmp_path: Path
) -> None:
    server = own_broker[0]
    config = write_config(tmp_path / "pipeline.toml", vt=VISIBILITY_TIMEOUT_S, soft=2, hard=3)
    stack = Stack(server.url, config, tmp_path)
    try:
        ids = [str(uuid.uuid4()) for _ in range(RECORDS)]
        for event_id in ids:
            stack.rt.dlq.put(dead_letter(event_id))
        assert stack.rt.dlq.depth() == RECORDS
        stack.state.set(fixed_key("demo.fail"), "1")

        replay = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "dlq", "replay", "--all", "--rate", "400",
             "--json"], env=stack.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        wait_for(lambda: stack.rt.dlq.depth() < RECORDS * 0.6, 30, "the replay to be under way")
        server.kill()
        _, err = replay.communicate(timeout=60)
        assert replay.returncode == 3, err
        assert "still in the DLQ or back on its tier queue" in err

        time.sleep(1)
        own_broker[0] = server = start_server(server.data_dir, port=server.port, persist=True)
        left = stack.rt.dlq.depth()
        assert 0 < left < RECORDS
        # Right after the restart, before any worker: each record is in exactly one place.
        assert left + stack.state.llen("standard") == RECORDS
        stack.start_worker("standard")

        def settled() -> bool:
            done = report(stack.state)["processed"]
            return done + stack.rt.dlq.depth() == RECORDS and stack.state.llen("standard") == 0

        wait_for(settled, VISIBILITY_TIMEOUT_S + 60, "replayed work to be processed", 0.5)
        time.sleep(VISIBILITY_TIMEOUT_S + 2)  # let any redelivery of in-flight work happen
        final = report(stack.state, with_ids=True)
        in_dlq = {r.event_id for r in stack.rt.dlq.iter_records()}
        assert final["processed"] + len(in_dlq) == RECORDS
        assert set(final["ids"]) | in_dlq == set(ids)
        assert not set(final["ids"]) & in_dlq
        assert final["duplicate_effects"] == 0
    finally:
        stack.stop()
