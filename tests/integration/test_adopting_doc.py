"""docs/adopting.md, executed: a team package built from the doc's own code blocks,
workers started from the team's app, on Redis and on RabbitMQ.

``theirapp/celery.py`` and ``theirapp/handlers.py`` are the doc's blocks as written,
with two substitutions (the broker URL and, so that runs on a shared RabbitMQ never
meet, the team's queue name, both read from the environment) and test probes
appended: a team task that records its runs, and handlers that fail once, always
fail, or record. The broker is set on the app only (no ``PIPELINE_BROKER_URL``).
Events are published by running the doc's "Publish" block. Workers:
``celery -A theirapp worker -Q their_queue,critical`` and a tier-only
``celery -A theirapp worker -Q standard``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from pipeline.core.retry import Reason
from tests.integration.rabbit import (
    AMQP_URL,
    delete_queues,
    new_prefix,
    rabbit_config,
    require_rabbitmq,
)
from tests.integration.support import Stack, Worker, wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "adopting.md"
DOC_BROKER = '"redis://redis:6379/0"'  # the broker URL the doc's example names
DOC_QUEUE = '"their_queue"'  # the team's queue in the doc's example
EFFECTS = "theirapp:effects"  # hash: key -> runs, written by the probes below
OTHER_BROKER = "redis://:pw@127.0.0.1:1/9"  # a PIPELINE_BROKER_URL naming another broker

TEAM_TASK_PROBE = '''

# -- test probe: a team task whose runs can be counted --
@app.task(name="theirapp.record")
def record(key: str) -> str:
    import redis
    redis.Redis.from_url(os.environ["THEIRAPP_EFFECTS_URL"]).hincrby("theirapp:effects", key, 1)
    return key
'''

HANDLER_PROBES = '''

# -- test probes: handlers that fail once, always fail, or just record --
from pipeline import PermanentError, current


def _done(event: Event) -> None:
    current().state.hincrby("theirapp:effects", str(event.id), 1)


@handler("team.flaky")
def flaky(event: Event) -> None:
    if current().attempt == 1:
        raise RuntimeError("fails on its first attempt")
    _done(event)


@handler("team.broken")
def broken(event: Event) -> None:
    raise PermanentError("never works")


@handler("team.ok")
def ok(event: Event) -> None:
    _done(event)
'''


def doc_block(first_line: str) -> str:
    """The doc's python block that starts with ``first_line``."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if b.startswith(first_line + "\n"))


def write_package(where: Path) -> Path:
    """``theirapp`` as the doc shows it, under ``where`` (the same bytes every time:
    the handler registry accepts the same function imported again)."""
    pkg = where / "theirapp"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    celery_py = doc_block("# theirapp/celery.py")
    assert DOC_BROKER in celery_py
    assert DOC_QUEUE in celery_py
    celery_py = (celery_py.replace(DOC_BROKER, 'os.environ["THEIRAPP_BROKER_URL"]')
                 .replace(DOC_QUEUE, 'os.environ["THEIRAPP_QUEUE"]'))
    (pkg / "celery.py").write_text("import os\n" + celery_py + TEAM_TASK_PROBE)
    handlers_py = doc_block("# theirapp/handlers.py")
    assert "from theirapp.celery import" in handlers_py  # a handler module using a team task
    (pkg / "handlers.py").write_text(handlers_py + HANDLER_PROBES)
    return where


@dataclass
class Team:
    broker: str
    queue: str  # the team's queue
    env: dict[str, str]
    cwd: Path
    stack: Stack  # reads effects and the DLQ through the pipeline's own app
    shared: Worker
    tier_only: Worker

    def python(self, script: str, env: dict[str, str] | None = None,
               timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", script], env={**self.env, **(env or {})},
                              cwd=self.cwd, capture_output=True, text=True, timeout=timeout_s)

    def publish(self, events: Sequence[Mapping[str, object]]) -> None:
        """Run the doc's "Publish" block with these ``events``."""
        script = (f"import json\nevents = json.loads({json.dumps(json.dumps(events))})\n"
                  + doc_block("from pipeline import publish, publish_many"))
        done = self.python(script)
        assert done.returncode == 0, done.stderr

    def effects(self) -> dict[str, int]:
        """Runs by key. On Redis the state store the workers' handlers wrote to is the
        app's broker: no URL for it was given to them."""
        raw = cast(dict[bytes, bytes], self.stack.state.hgetall(EFFECTS))
        return {k.decode(): int(v) for k, v in raw.items()}


def start(team_env: dict[str, str], cwd: Path, name: str, queues: str, log: Path) -> Worker:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "theirapp", "worker", "-Q", queues,
             "-c", "2", "-n", f"{name}@%h", "-l", "INFO", "--without-gossip",
             "--without-mingle"],
            env=team_env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    return Worker(name, process, log)


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def team(request: pytest.FixtureRequest, redis_url: str,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    on_rabbit = request.param == "rabbitmq"
    if on_rabbit:
        require_rabbitmq()
    prefix = new_prefix()
    tmp = tmp_path_factory.mktemp(f"adopting-{request.param}")
    pkg_root = write_package(tmp_path_factory.getbasetemp() / "adopting-package")
    broker = AMQP_URL if on_rabbit else redis_url
    if on_rabbit:
        config = rabbit_config(tmp / "pipeline.toml", prefix)
    else:
        config = write_config(tmp / "pipeline.toml")
    queue = f"{prefix}their_queue" if on_rabbit else "their_queue"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(THEIRAPP_BROKER_URL=broker, THEIRAPP_QUEUE=queue, THEIRAPP_EFFECTS_URL=redis_url,
               PIPELINE_CONFIG=str(config),
               PIPELINE_HANDLER_MODULES='["theirapp.handlers"]',
               PYTHONPATH=os.pathsep.join([str(pkg_root), str(ROOT)]))
    extra = {"PIPELINE_STATE_URL": redis_url} if on_rabbit else {}
    env.update(extra)
    stack = Stack(broker, config, tmp, env_extra=extra)
    critical, standard = (stack.rt.settings.queue_for(t) for t in ("critical", "standard"))
    shared = start(env, pkg_root, f"{prefix}shared", f"{queue},{critical}", tmp / "shared.log")
    tier_only = start(env, pkg_root, f"{prefix}standard", standard, tmp / "standard.log")
    try:
        shared.wait_ready()
        tier_only.wait_ready()
        yield Team(broker, queue, env, pkg_root, stack, shared, tier_only)
    finally:
        shared.stop()
        tier_only.stop()
        if on_rabbit:
            delete_queues(prefix, ("critical", "standard", "bulk", "dead_letter", "their_queue"))


def test_the_teams_own_tasks_run_as_before(team: Team) -> None:
    keys = [f"team-task-{uuid.uuid4()}" for _ in range(20)]
    done = team.python("import sys\nfrom theirapp.celery import record\n"
                       "for key in sys.argv[1:]:\n    record.delay(key)\n"
                       .replace("sys.argv[1:]", repr(keys)))
    assert done.returncode == 0, done.stderr
    wait_for(lambda: all(k in team.effects() for k in keys), 30, "the team's tasks")
    assert [team.effects()[k] for k in keys] == [1] * 20


def test_the_docs_publish_reaches_the_docs_handler_and_its_team_task(team: Team) -> None:
    team.publish([])  # the doc's block: one reward.granted, then publish_many([])
    wait_for(lambda: re.search(r"theirapp\.send_invoice\[[^\]]+\] succeeded", team.shared.log()),
             30, "send_invoice, sent by the doc's handler")


def test_events_that_fail_once_are_retried_and_done(team: Team) -> None:
    events = [{"id": str(uuid.uuid4()), "type": "team.flaky", "source": "team-tests",
               "tier": tier} for tier in ("critical", "standard") for _ in range(3)]
    team.publish(events)
    ids = [str(e["id"]) for e in events]
    wait_for(lambda: all(i in team.effects() for i in ids), 60, "the retried events")
    assert [team.effects()[i] for i in ids] == [1] * len(ids)
    assert not [r for r in team.stack.rt.dlq.records() if r.event_id in ids]


def test_a_permanent_failure_is_dead_lettered(team: Team) -> None:
    event_id = str(uuid.uuid4())
    team.publish([{"id": event_id, "type": "team.broken", "source": "team-tests",
                   "tier": "critical"}])
    record = team.stack.wait_dlq(event_id, timeout_s=30)
    assert record.reason is Reason.PERMANENT_ERROR
    assert record.handler == "theirapp.handlers.broken"


def test_events_of_every_priority_run(team: Team) -> None:
    events = [{"id": str(uuid.uuid4()), "type": "team.ok", "source": "team-tests",
               "tier": tier, "priority": priority}
              for tier in ("critical", "standard") for priority in range(10)]
    team.publish(events)
    ids = [str(e["id"]) for e in events]
    wait_for(lambda: all(i in team.effects() for i in ids), 60, "events of priorities 0-9")


def test_the_tier_only_worker_runs_with_the_tiers_settings(team: Team) -> None:
    assert "pipeline: tier 'standard' worker: prefetch multiplier 1" in team.tier_only.log()
    assert "pipeline: tier" not in team.shared.log()  # it serves their queue too
    for log in (team.shared.log(), team.tier_only.log()):
        assert "delayed delivery" not in log.lower()


def test_a_differing_pipeline_broker_url_is_refused(team: Team) -> None:
    done = team.python("import theirapp.celery", env={"PIPELINE_BROKER_URL": OTHER_BROKER})
    assert done.returncode != 0
    assert "ConfigError" in done.stderr
    assert "redis://:***@127.0.0.1:1/9" in done.stderr
    assert "not the broker of the Celery app" in done.stderr
    assert ":pw@" not in done.stderr
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "theirapp", "worker", "-Q", team.queue],
        env={**team.env, "PIPELINE_BROKER_URL": OTHER_BROKER}, cwd=team.cwd,
        capture_output=True, text=True, timeout=60)
    assert worker.returncode != 0
    assert "not the broker of the Celery app" in worker.stdout + worker.stderr

