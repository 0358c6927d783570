"""``pipeline config check`` and ``pipeline config show``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli

BAD_FIELDS = """
publish_max_retries = -1
dead_letter_queue = "bad name"
[tiers.standard]
concurrency = 0
"""

BAD_CROSS_FIELD = """
default_tier = "nosuch"
[tiers.standard]
queue = "dead_letter"
[[rules]]
type = "a.*"
tier = "ghost"
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_check_of_a_file_with_bad_values_exits_2_with_one_line_per_field(
    tmp_path: Path,
) -> None:
    code, _, err = run("config", "check", str(write(tmp_path, BAD_FIELDS)))
    assert code == 2
    assert sorted(line.split("=")[0] for line in err.splitlines()) == [
        "error: dead_letter_queue", "error: publish_max_retries",
        "error: tiers.standard.concurrency",
    ]


def test_check_of_a_file_with_cross_field_problems_lists_each(tmp_path: Path) -> None:
    code, _, err = run("config", "check", str(write(tmp_path, BAD_CROSS_FIELD)))
    assert code == 2
    assert [line.split("=")[0] for line in err.splitlines() if line.startswith("error")] == [
        "error: default_tier", "error: rules[0].tier", "error: tiers.standard.queue"
    ]


def test_check_of_a_missing_file_exits_2(tmp_path: Path) -> None:
    code, _, err = run("config", "check", str(tmp_path / "absent.toml"))
    assert code == 2
    assert "file not found" in err


def test_check_of_a_good_file_exits_0(tmp_path: Path) -> None:
    code, out, err = run("config", "check", str(write(tmp_path, 'dead_letter_queue = "dlq"\n')))
    assert (code, err) == (0, "")
    assert out.strip() == "ok: 4 tiers (critical, high, standard, bulk), 5 rules"


def test_show_json_prints_the_four_builtin_tiers() -> None:
    code, out, _ = run("config", "show", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data["tiers"]) == {"critical", "high", "standard", "bulk"}
    assert data["effective_broker_url"] == "redis://127.0.0.1:6379/0"


def test_show_without_json_does_not_print_json() -> None:
    code, out, _ = run("config", "show")
    assert code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_check_with_a_non_json_list_env_value_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_HANDLER_MODULES", "a.b")
    code, _, err = run("config", "check")
    assert code == 2
    assert "PIPELINE_HANDLER_MODULES" in err


def test_check_names_a_dlq_key_that_is_not_a_fernet_key_without_its_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_DLQ_KEYS", "a-secret-but-no-fernet-key")
    code, out, err = run("config", "check")
    assert code == 2
    assert "PIPELINE_DLQ_KEYS[0]" in err
    assert "a-secret-but-no-fernet-key" not in out + err


def test_every_process_refuses_to_start_with_a_bad_dlq_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.app import create_app
    from pipeline.config.load import load_settings
    from pipeline.errors import ConfigError

    monkeypatch.setenv("PIPELINE_DLQ_KEYS", "short")
    with pytest.raises(ConfigError, match=r"PIPELINE_DLQ_KEYS\[0\]"):
        create_app(load_settings(), main="bad-dlq-key")


BAD_HANDLERS_MODULE = '''
from pipeline import handler

@handler("partner.sync", name="badmod.partner_sync", downstreams=["partner-api"])
def partner_sync(event):
    pass

@handler("bulk.export", name="badmod.export", batchable=False)
def export(event):
    pass
'''

BATCHED_CONFIG = """
handler_modules = ["badmod_{suffix}"]
default_tier = "standard"
[tiers.standard]
[tiers.bulk]
batch_size = 100
[[rules]]
type = "bulk.*"
tier = "bulk"
"""


def test_check_reports_undefined_breakers_and_unbatchable_handlers_on_batch_tiers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = tmp_path.name.replace("-", "_")
    (tmp_path / f"badmod_{suffix}.py").write_text(BAD_HANDLERS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from pipeline.core.handlers import registry

    try:
        code, _, err = run("config", "check",
                           str(write(tmp_path, BATCHED_CONFIG.format(suffix=suffix))))
    finally:
        registry.unregister("badmod.partner_sync")
        registry.unregister("badmod.export")
    assert code == 2
    lines = err.splitlines()
    assert any(line.startswith("error: breakers.partner-api=") and "badmod.partner_sync" in line
               for line in lines), lines
    assert any(line.startswith("error: tiers.bulk.batch_size=100") and "batchable=False" in line
               for line in lines), lines


@pytest.mark.parametrize("as_json", [False, True], ids=["toml", "json"])
def test_show_masks_url_passwords_tokens_and_password_options(
        monkeypatch: pytest.MonkeyPatch, as_json: bool) -> None:
    monkeypatch.setenv("PIPELINE_BROKER_URL", "amqp://guest:brokerpw@rabbit:5672//")
    monkeypatch.setenv("PIPELINE_STATE_URL", "redis://:statepw@state:6379/2")
    monkeypatch.setenv("PIPELINE_BROKER_TRANSPORT_OPTIONS",
                       json.dumps({"sentinel_kwargs": {"password": "sentinelpw"}}))
    monkeypatch.setenv("PIPELINE_API_TOKEN", "tokenvalue-0123456789")
    code, out, _ = run("config", "show", *(["--json"] if as_json else []))
    assert code == 0
    for secret in ("brokerpw", "statepw", "sentinelpw", "tokenvalue"):
        assert secret not in out
    assert "amqp://guest:***@rabbit:5672//" in out
    assert "redis://:***@state:6379/2" in out


def test_an_unknown_key_gets_the_closest_known_one_suggested(tmp_path: Path) -> None:
    code, _, err = run("config", "check", str(write(tmp_path, "[tiers.standard]\n"
                                                               "max_retires = 3\n")))
    assert code == 2
    assert "tiers.standard.max_retires=3: unknown setting; did you mean `max_retries`?" in err
    code, _, err = run("config", "check", str(write(tmp_path, "max_retires = 3\n")))
    assert code == 2
    assert "did you mean `max_retries` in a [tiers.NAME] table?" in err


def test_a_tier_nothing_routes_to_is_a_warning_not_an_error(tmp_path: Path) -> None:
    text = ('[tiers.critical]\n[tiers.high]\n[tiers.standard]\n[tiers.bulk]\n[tiers.standrd]\n'
            '[[rules]]\ntype = "reward.*"\ntier = "critical"\n'
            '[[rules]]\ntype = "game.*"\ntier = "high"\n'
            '[[rules]]\ntype = "analytics.*"\ntier = "bulk"\n')
    code, out, err = run("config", "check", str(write(tmp_path, text)))
    assert code == 0, err
    assert err.splitlines() == [
        'warning: tiers.standrd: nothing routes to this tier: it is not default_tier and no '
        'rule names it, so only events that say "tier": "standrd" reach it; a typo of '
        '`standard`?']
    assert out.startswith("ok: 5 tiers")
    assert "1 warning(s)" in out


def test_a_file_that_replaces_the_builtin_tiers_and_rules_is_warned_about(
    tmp_path: Path,
) -> None:
    code, out, err = run("config", "check", str(write(tmp_path, "[tiers.standard]\n")))
    assert code == 0, err
    assert ("warning: tiers: this file declares [tiers], which replaces the built-in tiers "
            "and rules rather than merging: it drops the built-in tier(s) critical, high, bulk "
            "and drops the 5 built-in rules") in err
    assert out.startswith("ok: 1 tiers (standard), 0 rules, 1 warning(s)")


def test_the_builtin_default_and_the_k8s_config_check_without_warnings() -> None:
    for args in (("config", "check"), ("config", "check", "ops/k8s/pipeline.toml")):
        code, _, err = run(*args)
        assert code == 0
        assert "warning" not in err, err
