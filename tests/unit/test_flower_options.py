"""``pipeline flower``: authentication required, arguments built for Flower."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.observe.flower import TASK_COLUMNS, auth_mode, flower_argv, parse_basic_auth


def test_basic_auth_accepts_several_users() -> None:
    assert parse_basic_auth("ops:s3cret, dev:pw:with:colons") == ["ops:s3cret",
                                                                  "dev:pw:with:colons"]


@pytest.mark.parametrize("value", ["", "ops", "ops:", ":pw", "ops:pw,nopassword"])
def test_basic_auth_without_user_or_password_is_refused_without_echoing_it(value: str) -> None:
    with pytest.raises(ValueError, match="PIPELINE_FLOWER_BASIC_AUTH") as info:
        parse_basic_auth(value)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize(("env", "extra", "mode"), [
    ({}, (), None),
    ({"PIPELINE_FLOWER_BASIC_AUTH": "a:b"}, (), "basic"),
    ({"FLOWER_BASIC_AUTH": "a:b"}, (), "basic"),
    ({}, ("--basic_auth=a:b",), "basic"),
    ({}, ("--auth=.*@example\\.com", "--auth_provider=flower.views.auth.GithubLoginHandler"),
     "oauth"),
    ({"FLOWER_AUTH": ".*@example\\.com"}, (), "oauth"),
    ({}, ("--url_prefix=flower",), None),
])
def test_auth_mode_sees_basic_auth_and_oauth_options(
    env: dict[str, str], extra: tuple[str, ...], mode: str | None
) -> None:
    assert auth_mode(env, extra) == mode


def test_flower_argv_binds_the_address_and_shows_the_event_and_why_in_the_task_list() -> None:
    argv = flower_argv(host="0.0.0.0", port=5600, extra=("--url_prefix=flower",))
    assert argv[:3] == ["flower", "--address=0.0.0.0", "--port=5600"]
    assert f"--tasks_columns={TASK_COLUMNS}" in argv
    assert {"args", "exception"} <= set(TASK_COLUMNS.split(","))
    assert argv[-1] == "--url_prefix=flower"
    own = flower_argv(host="h", port=1, extra=("--tasks_columns=name,uuid",))
    assert [a for a in own if a.startswith("--tasks_columns")] == ["--tasks_columns=name,uuid"]


def test_flower_refuses_to_start_without_authentication() -> None:
    result = CliRunner().invoke(cli, ["flower", "--port", "5999"])
    assert result.exit_code == 2
    assert "no authentication" in result.output


def test_insecure_local_flower_refuses_a_non_loopback_address() -> None:
    result = CliRunner().invoke(cli, ["flower", "--insecure-local", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert "loopback only" in result.output
