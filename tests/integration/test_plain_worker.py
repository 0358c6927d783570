"""A plain `celery -A pipeline.app worker -Q <one tier queue>` takes the tier's
prefetch and time limits and says so in its banner; a `--prefetch-multiplier` given
on its command line wins, even when it equals the app's own value."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import Stack, Worker, wait_for, write_config

CELERY_DEFAULT_PREFETCH = 4  # Celery's worker_prefetch_multiplier, which the app keeps
CONCURRENCY = 2  # pool processes of the workers started here
INSPECT_TIMEOUT_S = 5.0  # one remote-control round trip
HARD_LIMIT_S = 5.0  # the test config's critical time limits (write_config defaults)
SOFT_LIMIT_S = 4.0


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(redis_url, write_config(tmp_path / "pipeline.toml"), tmp_path)
    try:
        yield stack
    finally:
        stack.stop()


def plain_worker(stack: Stack, node: str, *extra: str) -> Worker:
    """`celery -A pipeline.app worker -Q critical` as a team would start it."""
    log_path = stack.tmp / f"{node}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "pipeline.app", "worker", "-Q", "critical",
             "-c", str(CONCURRENCY), "-n", f"{node}@%h", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", *extra],
            env=stack.env(), stdout=log, stderr=subprocess.STDOUT)
    worker = Worker("critical", process, log_path)
    stack.workers.append(worker)
    return worker


def stats_of(stack: Stack, node_prefix: str) -> Mapping[str, Any]:
    def found() -> Mapping[str, Any] | None:
        replies = stack.rt.app.control.inspect(timeout=INSPECT_TIMEOUT_S).stats() or {}
        return next((v for k, v in replies.items() if k.startswith(f"{node_prefix}@")), None)

    return wait_for(found, 30, f"stats of {node_prefix}", 0.5)


def test_a_plain_worker_of_the_critical_queue_takes_the_tiers_prefetch_and_says_so(
    stack: Stack,
) -> None:
    tier = stack.rt.settings.tier("critical")
    assert tier.prefetch_multiplier != CELERY_DEFAULT_PREFETCH  # else this proves nothing
    worker = plain_worker(stack, "plain").wait_ready()
    stats = stats_of(stack, "plain")
    assert stats["prefetch_count"] == CONCURRENCY * tier.prefetch_multiplier
    assert stats["pool"]["timeouts"] == [SOFT_LIMIT_S, HARD_LIMIT_S]
    banner = worker.log()
    assert (f".> pipeline:    tier 'critical' worker: prefetch multiplier "
            f"{tier.prefetch_multiplier}, time limits {SOFT_LIMIT_S:g} s soft, "
            f"{HARD_LIMIT_S:g} s hard") in banner


def test_a_prefetch_multiplier_given_on_the_command_line_wins_even_if_it_equals_the_apps(
    stack: Stack,
) -> None:
    assert stack.rt.app.conf.worker_prefetch_multiplier == CELERY_DEFAULT_PREFETCH
    worker = plain_worker(stack, "explicit", "--prefetch-multiplier",
                          str(CELERY_DEFAULT_PREFETCH)).wait_ready()
    stats = stats_of(stack, "explicit")
    assert stats["prefetch_count"] == CONCURRENCY * CELERY_DEFAULT_PREFETCH
    assert (f"prefetch multiplier {CELERY_DEFAULT_PREFETCH} (command line; the tier's is "
            f"{stack.rt.settings.tier('critical').prefetch_multiplier})") in worker.log()
