"""Worker pools per tier: the setting, what config check refuses, what workers are given."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery.backends.base import DisabledBackend
from celery.concurrency import get_implementation
from click.testing import CliRunner
from pydantic import ValidationError

from pipeline.app import create_app
from pipeline.cli import cli
from pipeline.config import checks as configcheck
from pipeline.config.load import Settings, check_settings, load_settings
from pipeline.core.names import BATCH_TASK_NAME, TASK_NAME
from pipeline.core.pools import cli_pool, processes
from pipeline.core.tiers import TierConfig
from pipeline.worker.bootstep import apply_tier, pool_name, share_disabled_backend, worker_argv
from pipeline.worker.runtime import runtime_for

IO_TIER = """
default_tier = "io"
[tiers.io]
pool = "{pool}"
concurrency = 64
{ack}
"""


def settings_with(tmp_path: Path, pool: str, ack: bool) -> Settings:
    path = tmp_path / "pipeline.toml"
    path.write_text(IO_TIER.format(pool=pool,
                                   ack="accept_unenforced_time_limit = true" if ack else ""))
    return load_settings(path)


def problems(tmp_path: Path, pool: str, *, ack: bool) -> list[str]:
    return [str(p) for p in check_settings(settings_with(tmp_path, pool, ack))]


def test_tiers_run_the_prefork_pool_by_default() -> None:
    assert {t.pool for t in load_settings().tiers.values()} == {"prefork"}


def test_an_unknown_pool_is_refused_when_the_config_loads() -> None:
    with pytest.raises(ValidationError, match="pool"):
        TierConfig(pool="eventlet")


@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_a_pool_that_cannot_enforce_the_hard_limit_is_refused_unless_accepted(
    tmp_path: Path, pool: str,
) -> None:
    (problem,) = problems(tmp_path, pool, ack=False)
    assert problem.startswith("tiers.io.accept_unenforced_time_limit=False:")
    assert "timeouts that end it before time_limit_s" in problem
    assert "a synchronous handler" in problem
    assert "runs until it returns, for ever if" in problem  # nothing else ends it
    assert 'pool = "prefork"' in problem
    assert problems(tmp_path, pool, ack=True) == []


def test_a_gevent_tier_without_gevent_installed_is_refused_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(configcheck, "gevent_installed", lambda: False)
    (problem,) = problems(tmp_path, "gevent", ack=True)
    assert problem.startswith("tiers.io.pool='gevent'")
    assert "pip install 'celery-event-pipeline[gevent]'" in problem


def test_config_check_exits_2_for_a_threads_tier_that_did_not_accept(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.toml"
    path.write_text(IO_TIER.format(pool="threads", ack=""))
    result = CliRunner().invoke(cli, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "error: tiers.io.accept_unenforced_time_limit" in result.stderr


def test_worker_argv_passes_the_tiers_pool_and_its_concurrency(tmp_path: Path) -> None:
    argv = worker_argv(settings_with(tmp_path, "threads", True), "io")
    assert argv[argv.index("--pool") + 1] == "threads"
    assert argv[argv.index("--concurrency") + 1] == "64"


@pytest.mark.parametrize(("argv", "pool"), [
    (["-P", "gevent"], "gevent"), (["--pool", "threads"], "threads"),
    (["--pool=threads"], "threads"), (["-Pgevent"], "gevent"), (["-c", "4"], None),
])
def test_the_pool_named_on_a_worker_command_line_is_read_in_every_spelling(
    argv: list[str], pool: str | None,
) -> None:
    assert cli_pool(argv) == pool


def test_a_rate_limit_is_shared_over_processes_only_in_the_prefork_pool() -> None:
    assert (processes("prefork", 4), processes("threads", 64), processes("gevent", 64)) == \
        (4, 1, 1)


def fake_worker(tmp_path: Path, pool: str, given: str | None) -> SimpleNamespace:
    app = create_app(settings_with(tmp_path, pool, True), main=f"pools-{pool}")
    return SimpleNamespace(
        app=app, prefetch_multiplier=app.conf.worker_prefetch_multiplier,
        time_limit=app.conf.task_time_limit, soft_time_limit=app.conf.task_soft_time_limit,
        pool_cls=get_implementation(given or app.conf.worker_pool),
        pipeline_given_options={"pool"} if given else set())  # what -P on the CLI records


def test_a_plain_worker_of_a_threads_tier_without_a_pool_option_runs_threads(
    tmp_path: Path,
) -> None:
    worker = fake_worker(tmp_path, "threads", None)
    said = apply_tier(worker, runtime_for(worker.app).settings, "io")
    assert pool_name(worker.pool_cls) == "threads"
    assert "pool threads" in said


def test_a_pool_given_on_the_command_line_wins_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    worker = fake_worker(tmp_path, "threads", "solo")
    said = apply_tier(worker, runtime_for(worker.app).settings, "io")
    assert pool_name(worker.pool_cls) != "threads"
    assert "(command line; the tier's is threads)" in said
    assert "the tier's pool is threads" in caplog.text


def test_a_plain_worker_of_a_gevent_tier_started_unpatched_keeps_its_pool_and_says_how(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    worker = fake_worker(tmp_path, "gevent", None)
    said = apply_tier(worker, runtime_for(worker.app).settings, "io")
    assert pool_name(worker.pool_cls) == "prefork"
    assert "gevent needs -P gevent on the command line" in said


def test_the_readmes_pool_block_is_a_tier_config_check_accepts(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = [b for b in readme.split("```toml\n")[1:] if "pool = " in b.split("```")[0]]
    path = tmp_path / "pipeline.toml"
    path.write_text('default_tier = "partner-sync"\n' + block.split("```")[0])
    settings = load_settings(path)
    tier = settings.tier("partner-sync")
    assert (tier.pool, tier.concurrency, tier.accept_unenforced_time_limit) == ("gevent", 64, True)
    assert check_settings(settings) == []


def test_every_thread_of_a_worker_marks_its_tasks_done_with_one_disabled_backend(
    tmp_path: Path,
) -> None:
    """Under gevent each attempt is a new greenlet, with a thread-local of its own:
    without a result backend, no attempt should build a backend of its own."""
    app = create_app(settings_with(tmp_path, "gevent", True), main="pools-backend")

    def backend_in_a_new_thread() -> object:
        seen: list[object] = []
        thread = threading.Thread(target=lambda: seen.append(app.tasks[TASK_NAME].backend))
        thread.start()
        thread.join()
        return seen[0]

    assert backend_in_a_new_thread() is not backend_in_a_new_thread()  # Celery's default
    share_disabled_backend(app)
    shared = app.tasks[TASK_NAME].backend
    assert isinstance(shared, DisabledBackend)
    assert backend_in_a_new_thread() is shared
    assert app.tasks[BATCH_TASK_NAME].backend is shared
