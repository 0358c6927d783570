"""A batch's process killed while Redis is too busy to read what it wrote: every settle
it wrote still takes effect (a real server, a real process, SIGKILL)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from pipeline.core.state import Keys
from pipeline.local.embedded import start_server
from tests.integration.support import wait_for

SETTLED_EARLY = 20  # settles Redis runs (and answers) before it gets busy
SETTLED_LATE = 20  # settles written while it is busy, just before the kill
BUSY_S = 1.5  # how long a script holds the server
BUSY_LUA = """
local t = redis.call('TIME')
local start = t[1] + t[2] / 1e6
repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 - start > tonumber(ARGV[1])
return 1
"""

# the batch's process: begins 50 tries, settles some, waits, settles more, is killed
CHILD = """
import os, signal, sys, time, uuid
from pathlib import Path
import redis
from pipeline.core.tiers import TierConfig
from pipeline.worker.batchledger import BatchLedger
from pipeline.worker.ledger import Ledger, Try

url, tmp, early, late = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ledger = Ledger(redis.Redis.from_url(url), window_s=3600)
tries = [Try((str(uuid.uuid4()), "1.0", uuid.uuid4().hex), 1, "t", TierConfig(), False)
         for _ in range(50)]
(tmp / "tasks").write_text("\\n".join(t.ids[0] for t in tries))
batch = BatchLedger(ledger)
assert [b.verdict for b in batch.begin_many(tries)] == ["run"] * 50
batch.start(tries[0])
for i in range(early):
    batch.settle_done(tries[i], tries[i + 1], redo=lambda: None)
time.sleep(0.5)  # Redis ran those (and answered, unless the stream turned replies off)
(tmp / "early").touch()
while not (tmp / "go").exists():
    time.sleep(0.01)
for i in range(early, early + late):
    batch.settle_done(tries[i], tries[i + 1], redo=lambda: None)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("repeat", range(2))
def test_settles_written_before_a_kill_take_effect_though_redis_read_them_after_it(
    tmp_path: Path, repeat: int,
) -> None:
    server = start_server(tmp_path / "broker", persist=False)
    try:
        client = redis.Redis.from_url(server.url)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, server.url, str(tmp_path), str(SETTLED_EARLY),
             str(SETTLED_LATE)], env={**os.environ, "PYTHONPATH": os.getcwd()})
        wait_for(lambda: (tmp_path / "early").exists() or child.poll() is not None, 30,
                 "the early settles")
        busy = threading.Thread(target=lambda: redis.Redis.from_url(server.url).eval(
            BUSY_LUA, 0, BUSY_S), daemon=True)
        busy.start()
        time.sleep(0.2)  # the server is inside the script: it reads no socket
        (tmp_path / "go").touch()
        assert child.wait(30) == -9  # killed while Redis had not read its last writes
        busy.join(BUSY_S + 10)
        tasks = (tmp_path / "tasks").read_text().split()
        settled = SETTLED_EARLY + SETTLED_LATE
        done = [bool(client.exists(Keys.done(task))) for task in tasks]
        assert done == [True] * settled + [False] * (50 - settled)
        started = client.get(Keys.running(tasks[settled], "1.0"))
        assert isinstance(started, bytes)
        assert not started.startswith(b"~")  # the last settle started the next try
    finally:
        server.stop()
