"""API tokens: empty, blank or short ones never load; scopes; secrets from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.config.load import load_settings
from pipeline.core.tokens import ALL_SCOPES, MIN_TOKEN_CHARS, Credential, credentials
from pipeline.errors import ConfigError

GOOD = "A" * MIN_TOKEN_CHARS
BAD_TOKENS = {"empty": "", "blank": "      ", "short": "abc123", "one-char": "x",
              "fifteen": "y" * (MIN_TOKEN_CHARS - 1), "inner-space": "abcdefgh ijklmnopq",
              "placeholder": "change-me-api-token"}
HINT = "secrets.token_urlsafe(32)"


def refused(**env: str) -> str:
    """The message of the ConfigError loading settings with ``env`` raises."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
    return str(info.value)


@pytest.mark.parametrize("value", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_api_token_that_could_be_guessed_refuses_to_load_without_echoing_it(value: str) -> None:
    message = refused(PIPELINE_API_TOKEN=value)
    assert "api_token" in message
    assert HINT in message
    assert value.strip() == "" or value not in message


@pytest.mark.parametrize("value", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_named_plain_token_that_could_be_guessed_refuses_to_load(value: str) -> None:
    message = refused(PIPELINE_API_TOKENS=json.dumps({"ops": value}))
    assert "api_tokens.ops" in message
    assert HINT in message
    assert value.strip() == "" or value not in message


def test_malformed_tokens_json_is_not_echoed() -> None:
    message = refused(PIPELINE_API_TOKENS='{"ops": "super-secret-value-123')
    assert "api_tokens" in message
    assert "super-secret" not in message


def test_a_token_table_never_holds_its_secret_inline() -> None:
    message = refused(PIPELINE_API_TOKENS=json.dumps(
        {"ops": {"token": GOOD + "-inline", "scopes": ["dlq:read"]}}))
    assert "token_env" in message
    assert GOOD not in message


def test_unknown_scope_is_named() -> None:
    message = refused(PIPELINE_API_TOKENS=json.dumps(
        {"ops": {"token_env": "OPS_TOKEN", "scopes": ["dlq:raed"]}}))
    assert "api_tokens.ops.scopes.0" in message
    assert "dlq:raed" in message


def test_a_table_with_an_empty_scope_list_is_refused() -> None:
    message = refused(PIPELINE_API_TOKENS=json.dumps({"ops": {"token_env": "X", "scopes": []}}))
    assert "api_tokens.ops.scopes" in message


def settings_with(tokens: dict[str, Any], **more: Any) -> Any:
    return load_settings(api_tokens=tokens, **more)


def test_token_env_secret_is_read_from_the_environment_with_its_scopes() -> None:
    settings = settings_with({"game": {"token_env": "GAME_TOKEN", "scopes": ["ingest"],
                                       "sources": ["game-*"]}}, api_token=GOOD)
    creds, problems = credentials(settings, {"GAME_TOKEN": "g" * 40})
    assert problems == []
    assert creds == [Credential("default", GOOD),
                     Credential("game", "g" * 40, frozenset({"ingest"}), ("game-*",))]
    assert creds[1].may_publish("game-server")
    assert not creds[1].may_publish("billing")


@pytest.mark.parametrize("value", [None, *BAD_TOKENS.values()],
                         ids=["unset", *BAD_TOKENS.keys()])
def test_token_env_unset_or_weak_is_a_problem_naming_the_field(value: str | None) -> None:
    settings = settings_with({"game": {"token_env": "GAME_TOKEN", "scopes": ["ingest"]}})
    creds, problems = credentials(settings, {} if value is None else {"GAME_TOKEN": value})
    assert creds == []
    assert [p.field for p in problems] == ["api_tokens.game.token_env"]
    assert HINT in str(problems[0])
    assert value is None or value.strip() == "" or value not in str(problems[0])


def test_plain_string_tokens_keep_every_scope() -> None:
    creds, _ = credentials(settings_with({"ops": GOOD}), {})
    assert creds[0].scopes == frozenset(ALL_SCOPES)
    assert creds[0].sources == ()


def test_two_names_for_one_token_are_refused_without_showing_it() -> None:
    _, problems = credentials(settings_with({"ops": GOOD}, api_token=GOOD), {})
    assert [p.field for p in problems] == ["api_tokens.ops"]
    assert GOOD not in str(problems[0])


def test_sources_without_the_ingest_scope_make_no_sense() -> None:
    with pytest.raises(ConfigError, match="no ingest scope"):
        settings_with({"ops": {"token_env": "X", "scopes": ["dlq:read"], "sources": ["a"]}})


def test_config_check_explains_a_named_token_without_scopes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_API_TOKENS", json.dumps({"ops": GOOD}))
    result = CliRunner().invoke(cli, ["config", "check"])
    assert result.exit_code == 0, result.output
    assert "note: api_tokens.ops: no scopes listed" in result.stderr
    assert GOOD not in result.output + result.stderr


def test_config_check_refuses_an_unset_token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_API_TOKENS", json.dumps(
        {"ops": {"token_env": "PIPELINE_TEST_NO_SUCH_TOKEN", "scopes": ["dlq:read"]}}))
    result = CliRunner().invoke(cli, ["config", "check"])
    assert result.exit_code == 2
    assert "api_tokens.ops.token_env" in result.stderr
    assert "is not set" in result.stderr


def serve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pipeline serve`` in a process of its own (the in-process app caches its settings)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return subprocess.run([sys.executable, "-m", "pipeline", "serve", *args], env={
        **clean, "PIPELINE_BROKER_URL": "redis://127.0.0.1:1/0", **env},
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["", "   ", "short"])
def test_serve_refuses_a_weak_token(value: str) -> None:
    result = serve(PIPELINE_API_TOKEN=value)
    assert result.returncode == 2
    assert "api_token" in result.stderr
    assert HINT in result.stderr


def test_serve_without_any_token_refuses_and_says_how_to_make_one() -> None:
    result = serve()
    assert result.returncode == 2
    assert "PIPELINE_API_TOKEN" in result.stderr
    assert HINT in result.stderr


def test_insecure_local_never_binds_beyond_loopback() -> None:
    result = serve("--insecure-local", "--host", "0.0.0.0", PIPELINE_API_TOKEN=GOOD)
    assert result.returncode == 2
    assert "loopback only" in result.stderr


def test_insecure_local_generates_a_token_for_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from pipeline.app import create_app
    from pipeline.cli import run
    from pipeline.worker.runtime import runtime_for

    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda api, **kw: served.update(api=api, **kw))
    monkeypatch.setattr(run, "runtime", lambda: runtime_for(create_app(load_settings())))
    result = CliRunner().invoke(cli, ["serve", "--insecure-local"])
    assert result.exit_code == 0, result.output
    (cred,) = served["api"].state.credentials
    assert len(cred.secret) >= MIN_TOKEN_CHARS
    assert f"PIPELINE_API_TOKEN={cred.secret}" in result.stderr
    assert served["host"] == "127.0.0.1"
