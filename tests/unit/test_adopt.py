"""attach takes the broker from the app, never lowers its transport options, and
leaves no priority sub-list it writes to unread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.concurrency import get_implementation

from pipeline.app import attach
from pipeline.config.load import load_settings
from pipeline.core.redisurl import same_broker
from pipeline.errors import ConfigError
from pipeline.worker import adopt
from pipeline.worker.bootstep import GIVEN_ATTR, apply_tier, refuse_unread_priorities
from pipeline.worker.runtime import runtime_for

ROOT = Path(__file__).resolve().parents[2]
TEAM_BROKER = "redis://:s3cret@team-redis:6379/3"


def team_app(**conf: object) -> Celery:
    app = Celery("team", broker=TEAM_BROKER, set_as_current=False)
    app.conf.update(**conf)
    return app


def test_attach_uses_the_apps_broker_and_state_store() -> None:
    app = attach(team_app(), load_settings())
    settings = runtime_for(app).settings
    assert settings.effective_broker_url == TEAM_BROKER
    assert settings.effective_state_url == TEAM_BROKER


def test_a_differing_pipeline_broker_is_refused_naming_both_without_passwords() -> None:
    with pytest.raises(ConfigError) as err:
        attach(team_app(), load_settings(broker_url="redis://:other@elsewhere:6379/0"))
    text = str(err.value)
    assert "broker_url" in text
    assert "redis://:***@elsewhere:6379/0" in text
    assert "redis://:***@team-redis:6379/3" in text
    assert "s3cret" not in text
    assert "other@" not in text


def test_the_same_broker_spelled_otherwise_is_accepted() -> None:
    app = attach(team_app(), load_settings(broker_url="redis://TEAM-redis/3"))
    assert runtime_for(app).settings.effective_broker_url == TEAM_BROKER


def test_an_app_without_a_broker_gets_the_pipelines() -> None:
    app = Celery("bare", set_as_current=False)
    attach(app, load_settings(broker_url="redis://127.0.0.1:6379/5"))
    assert app.conf.broker_url == "redis://127.0.0.1:6379/5"


@pytest.mark.parametrize(("a", "b", "same"), [
    ("amqp://guest:guest@rabbit:5672//", "pyamqp://guest:x@RABBIT/", True),
    ("amqp://guest@rabbit//", "amqp://guest@rabbit/other", False),
    ("amqp://guest@rabbit//", "redis://rabbit:6379/0", False),
    ("redis://h:6379/0", "rediss://h/0", True),
    ("redis://h:6379/0", "redis://h:6379/1", False),
])
def test_same_broker(a: str, b: str, same: bool) -> None:
    assert same_broker(a, b) is same


def test_kombus_default_visibility_timeout_counts_as_set() -> None:
    # kombu's default is 3600 s: a tier needing less leaves it alone, never lowers it
    app = attach(team_app(), load_settings())
    assert runtime_for(app).settings.visibility_timeout_s < 3600
    assert "visibility_timeout" not in app.conf.broker_transport_options
    assert adopt.raised_visibility({}, 5000.0) == 5000.0
    assert adopt.raised_visibility({"visibility_timeout": 7200}, 5000.0) is None
    assert adopt.raised_visibility({"visibility_timeout": 10}, 60.0) == 60.0


def test_a_lower_visibility_timeout_is_raised_and_other_options_kept() -> None:
    app = attach(team_app(broker_transport_options={"visibility_timeout": 10,
                                                    "max_connections": 7}),
                 load_settings())
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == runtime_for(app).settings.visibility_timeout_s
    assert options["max_connections"] == 7


def test_attach_sets_a_priority_step_per_priority_the_pipeline_writes() -> None:
    assert adopt.missing_priorities(None) == [1, 2, 4, 5, 7, 8]  # kombu's [0, 3, 6, 9]
    app = attach(team_app(), load_settings())
    assert app.conf.broker_transport_options["priority_steps"] == list(range(10))


def test_priority_steps_the_app_set_that_leave_sub_lists_unread_are_refused() -> None:
    with pytest.raises(ConfigError) as err:
        attach(team_app(broker_transport_options={"priority_steps": [0, 3, 6, 9]}),
               load_settings())
    assert adopt.PRIORITY_STEPS_FIELD in str(err.value)
    assert "[1, 2, 4, 5, 7, 8]" in str(err.value)


def test_a_tier_worker_that_cannot_read_every_sub_list_is_refused() -> None:
    refuse_unread_priorities({"priority_steps": list(range(10))}, ["critical"])
    with pytest.raises(SystemExit) as exited:
        refuse_unread_priorities({}, ["critical"])
    assert exited.value.code == 2


def test_importing_pipeline_and_attaching_import_no_handler_module(tmp_path: Path) -> None:
    """A handler module that imports the team's app module (a circular import if
    attach imported it) loads at the first publish, not before."""
    pkg = tmp_path / "circ_team"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "celery.py").write_text(
        "from celery import Celery\n"
        "from pipeline.app import attach\n"
        "from pipeline.config.load import load_settings\n"
        "app = Celery('circ', broker='redis://127.0.0.1:1/0', set_as_current=False)\n"
        "@app.task(name='circ.job')\n"
        "def job() -> None: ...\n"
        "attach(app, load_settings())\n")
    (pkg / "handlers.py").write_text(
        "from pipeline import Event, handler\n"
        "from circ_team.celery import job\n"
        "@handler('circ.event')\n"
        "def on_event(event: Event) -> None:\n"
        "    job.delay()\n")
    script = (
        "from circ_team.celery import app\n"  # as a worker does: the app module first
        "import pipeline.app\n"
        "from pipeline.core.handlers import registry\n"
        "from pipeline.worker.runtime import runtime_for\n"
        "assert pipeline.app._default is None, 'the default app was built'\n"
        "assert registry.for_type('circ.event') == [], 'handlers imported by attach'\n"
        "runtime_for(app).publisher\n"  # what the first publish does first
        "assert [h.name for h in registry.for_type('circ.event')] == "
        "['circ_team.handlers.on_event']\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PIPELINE_HANDLER_MODULES='["circ_team.handlers"]',
               PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def fake_worker(app: Celery, **given: object) -> SimpleNamespace:
    """What a worker's ``setup_defaults`` leaves: the command line, else the app's conf;
    and which options were given (recorded at ``celeryd_init``)."""
    attrs = {"prefetch_multiplier": app.conf.worker_prefetch_multiplier,
             "pool_cls": get_implementation(app.conf.worker_pool),
             "time_limit": app.conf.task_time_limit,
             "soft_time_limit": app.conf.task_soft_time_limit, **given}
    return SimpleNamespace(app=app, **attrs, **{GIVEN_ATTR: set(given)})


def test_a_plain_worker_of_one_tier_queue_gets_the_tiers_prefetch_and_limits() -> None:
    app = attach(team_app(worker_prefetch_multiplier=8), load_settings())
    tier = runtime_for(app).settings.tier("critical")
    worker = fake_worker(app)
    said = apply_tier(worker, runtime_for(app).settings, "critical")
    assert worker.prefetch_multiplier == tier.prefetch_multiplier
    assert (worker.soft_time_limit, worker.time_limit) == (tier.soft_time_limit_s,
                                                           tier.time_limit_s)
    assert app.tasks["pipeline.handle"].time_limit == tier.time_limit_s
    assert "tier 'critical' worker: prefetch multiplier 1" in said


def test_a_prefetch_given_on_the_command_line_is_kept_and_said() -> None:
    app = attach(team_app(), load_settings())
    worker = fake_worker(app, prefetch_multiplier=16)
    said = apply_tier(worker, runtime_for(app).settings, "bulk")
    assert worker.prefetch_multiplier == 16
    assert "16 (command line" in said
