"""A Redis broker with ``state_url`` on another database: every entry point refuses.

Reproduced before the check: `config check` said ok, `send` accepted 10 of 10 and
workers handled none, because ingest pushed the tasks into the *state* database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from tests.integration.support import write_config

EXIT_CONFIG = 2  # pipeline.cli.base.EXIT_CONFIG: bad usage or configuration
MAX_DB = 15  # Redis' highest database number
PASSWORD = "s3cret-never-shown"  # in the state URL; must not appear in any output
CLI_TIMEOUT_S = 60  # a refusal takes an interpreter start, not this


def other_db(redis_url: str) -> tuple[str, int]:
    """The URL of a database next to ``redis_url``'s on the same server, and its number."""
    base, db = redis_url.rsplit("/", 1)
    neighbour = int(db) % MAX_DB + 1
    return f"{base}/{neighbour}", neighbour


def keys_with(url: str, token: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=f"*{token}*"))
    finally:
        client.close()


@pytest.fixture
def split_env(redis_url: str, tmp_path: Path) -> tuple[dict[str, str], str, str]:
    """(env with broker and state on two databases, the state URL, a unique token)."""
    token = uuid.uuid4().hex[:12]
    state_url, _ = other_db(redis_url)
    with_password = state_url.replace("redis://", f"redis://:{PASSWORD}@", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update(PIPELINE_BROKER_URL=redis_url, PIPELINE_STATE_URL=with_password,
               PIPELINE_CONFIG=str(write_config(tmp_path / "pipeline.toml",
                                                prefix=f"{token}-")))
    return env, state_url, token


def run(env: dict[str, str], *args: str, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=CLI_TIMEOUT_S)


def assert_refused(proc: subprocess.CompletedProcess[str]) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == EXIT_CONFIG, output
    assert "state_url=" in output, output
    assert "one atomic step moves work between the pipeline's state and the tier queues" \
        in output
    assert "unset state_url to use the broker" in output
    assert ":***@" in output
    assert PASSWORD not in output


def test_config_check_and_send_refuse_and_write_nothing_to_either_redis(
        split_env: tuple[dict[str, str], str, str], redis_url: str, tmp_path: Path) -> None:
    env, state_url, token = split_env
    events = tmp_path / "events.jsonl"
    events.write_text("".join(
        json.dumps({"id": f"{token}-{i}", "type": "demo.ok", "source": "cli"}) + "\n"
        for i in range(10)))
    broker = redis.Redis.from_url(redis_url)
    keys_before = broker.dbsize()

    check = run(env, sys.executable, "-m", "pipeline", "config", "check")
    assert_refused(check)
    assert "ok:" not in check.stdout
    send = run(env, sys.executable, "-m", "pipeline", "send", str(events))
    assert_refused(send)
    assert "accepted" not in send.stdout + send.stderr

    assert broker.dbsize() == keys_before
    broker.close()
    assert keys_with(redis_url, token) == []
    assert keys_with(state_url, token) == []


@pytest.mark.parametrize("command", [
    ["pipeline", "worker", "--tier", "standard"],
    ["pipeline", "serve", "--insecure-local"],
    ["pipeline", "up", "--state-dir", "up-state"],
    ["celery", "-A", "pipeline.app", "worker"],
], ids=["worker", "serve", "up", "celery-worker"])
def test_every_process_refuses_a_state_url_apart_from_the_broker(
        split_env: tuple[dict[str, str], str, str], tmp_path: Path,
        command: list[str]) -> None:
    env, _, _ = split_env
    if command[0] == "pipeline":
        argv = [sys.executable, "-m", "pipeline", *command[1:]]
    else:
        argv = [sys.executable, "-m", "celery", *command[1:]]
    proc = run(env, *argv, cwd=tmp_path)
    assert_refused(proc)
    assert not (tmp_path / "up-state").exists()  # `up` started nothing
