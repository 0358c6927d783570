"""`pipeline up` with a tier on the threads pool: that tier's worker runs threads in
one process (the other tiers stay prefork), and an event published to it is
handled once."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from pipeline.app import create_app
from pipeline.config.load import load_settings
from pipeline.core.state import Keys
from pipeline.worker.runtime import runtime_for
from tests.integration.support import descendants, wait_for
from tests.integration.test_stack import cmdline, direct_children, read_env_file, stacks_started

THREADS_TOML = ('handler_modules = ["pipeline.demo"]\n'
                "[tiers.critical]\nconcurrency = 1\nprefetch_multiplier = 1\n"
                '[tiers.standard]\npool = "threads"\naccept_unenforced_time_limit = true\n'
                "concurrency = 8\n")


def worker_pid(up_pid: int, tier: str) -> int:
    (pid,) = [p for p in direct_children(up_pid)
              if cmdline(p).endswith(f"worker --tier {tier} ")]
    return pid


def test_pipeline_up_runs_a_threads_tier_on_threads_and_handles_its_event_once(
    tmp_path: Path,
) -> None:
    with stacks_started(tmp_path) as start:
        up = start(config=THREADS_TOML)
        up.banner_value("broker")
        up.wait_ready("standard")
        up.wait_ready("critical")
        log = up.worker_log("standard")
        assert "tier 'standard' worker: " in log
        assert ", pool threads (the tier's settings)" in log
        assert ", pool prefork (the tier's settings)" in up.worker_log("critical")
        standard = worker_pid(up.process.pid, "standard")
        assert descendants(standard) == set()  # threads: no pool processes
        assert descendants(worker_pid(up.process.pid, "critical"))  # prefork: a child

        url = read_env_file(up.state / "stack.env")["PIPELINE_BROKER_URL"]
        settings = load_settings(tmp_path / "small.toml", broker_url=url)
        publisher = runtime_for(create_app(settings, main="stack-pools")).publisher
        result = publisher.publish({"type": "demo.ok", "source": "stack-test",
                                    "tier": "standard"})
        assert result.outcome == "accepted"
        assert result.tier == "standard"
        client = redis.Redis.from_url(url)
        try:
            wait_for(lambda: client.hexists(Keys.demo_effects(), str(result.id)), 30,
                     "the event to be handled")
            time.sleep(1.0)  # a second run, were there one
            assert int(client.hget(Keys.demo_effects(), str(result.id)) or 0) == 1
        finally:
            client.close()
        assert str(result.id) in up.worker_log("standard")
        assert str(result.id) not in up.worker_log("critical")
