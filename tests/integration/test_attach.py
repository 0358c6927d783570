"""Attaching the pipeline to a Celery app a team already has."""

from __future__ import annotations

import importlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from pipeline.worker.inflight import CONSUMERS_KEY
from pipeline.worker.runtime import runtime_for
from tests.integration.support import Stack, Worker, wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def team(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    tmp = tmp_path_factory.mktemp("attach")
    config = write_config(tmp / "pipeline.toml")
    mp = pytest.MonkeyPatch()
    mp.setenv("PIPELINE_BROKER_URL", redis_url)
    mp.setenv("PIPELINE_CONFIG", str(config))
    sys.modules.pop("tests.integration.team_app", None)
    module = importlib.import_module("tests.integration.team_app")
    module.tmp = tmp  # type: ignore[attr-defined]
    module.config = config  # type: ignore[attr-defined]
    yield module
    mp.undo()


def test_attach_keeps_the_teams_queues_tasks_and_settings(team: ModuleType) -> None:
    app = team.app
    names = [q.name for q in app.conf.task_queues]
    assert names[0] == "team_jobs"
    assert {"critical", "standard", "bulk"} <= set(names)
    assert app.conf.task_default_queue == "team_jobs"
    assert app.conf.worker_prefetch_multiplier == 7
    assert "team.record" in app.tasks
    assert "pipeline.handle" in app.tasks
    # Their visibility timeout (10 s) is raised to what the tiers need, never lowered.
    needed = runtime_for(app).settings.visibility_timeout_s
    assert app.conf.broker_transport_options["visibility_timeout"] == needed > 10


def test_one_worker_of_the_team_app_runs_their_tasks_and_pipeline_events(
    team: ModuleType, redis_url: str
) -> None:
    stack = Stack(redis_url, team.config, team.tmp)
    log_path = team.tmp / "team-worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.integration.team_app", "worker",
             "-Q", "team_jobs,standard", "-c", "1", "-l", "INFO",
             "--without-gossip", "--without-mingle"],
            env=stack.env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    worker = Worker("team", process, log_path)
    try:
        worker.wait_ready()
        key = str(uuid.uuid4())
        team.record.delay(key)
        event = runtime_for(team.app).publisher.publish(
            {"type": "demo.ok", "source": "team-service"})
        assert event.id is not None
        stack.wait_effect(event.id)
        wait_for(lambda: stack.state.hget("team:effects", key), 10, "the team's own task")
        # the team's worker consumes through the pipeline's reliable fetch
        with team.app.connection() as conn:
            assert type(conn.transport).__module__ == "pipeline.worker.fetch"
        assert stack.state.zcard(CONSUMERS_KEY) >= 1
    finally:
        worker.stop()
