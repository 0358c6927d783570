"""Settings: built-in default, TOML file, environment, and check_settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config.load import Settings, check_settings, load_settings
from pipeline.core.tiers import Rule, TierConfig
from pipeline.errors import ConfigError

ONE_TIER = """
default_tier = "only"
[tiers.only]
concurrency = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def problem_fields(settings: Settings, **kwargs: bool) -> list[str]:
    return [p.field for p in check_settings(settings, **kwargs)]


def test_builtin_default_has_exactly_the_four_tiers() -> None:
    assert set(load_settings().tiers) == {"critical", "high", "standard", "bulk"}


def test_builtin_critical_tier_prefetches_one_and_retries_more_than_bulk() -> None:
    tiers = load_settings().tiers
    assert tiers["critical"].prefetch_multiplier == 1
    assert tiers["critical"].max_retries > tiers["bulk"].max_retries


def test_builtin_bulk_tier_has_higher_concurrency_than_critical() -> None:
    tiers = load_settings().tiers
    assert tiers["bulk"].concurrency > tiers["critical"].concurrency


def test_sound_default_config_has_no_problems() -> None:
    assert check_settings(load_settings(), import_handlers=True) == []


def test_file_overrides_scalars_and_keeps_builtin_tiers(tmp_path: Path) -> None:
    path = write(tmp_path, 'dead_letter_queue = "dlq"\npublish_max_retries = 7\n')
    settings = load_settings(path)
    assert (settings.dead_letter_queue, settings.publish_max_retries) == ("dlq", 7)
    assert set(settings.tiers) == {"critical", "high", "standard", "bulk"}
    assert settings.rules


def test_file_declaring_tiers_replaces_builtin_tiers_and_rules(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ONE_TIER))
    assert list(settings.tiers) == ["only"]
    assert settings.tiers["only"].concurrency == 3
    assert settings.rules == []


def test_load_settings_restores_the_config_env_variable(tmp_path: Path) -> None:
    load_settings(write(tmp_path, ONE_TIER))
    assert set(load_settings().tiers) == {"critical", "high", "standard", "bulk"}


def test_env_overrides_one_nested_tier_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_TIERS__CRITICAL__CONCURRENCY", "9")
    critical = load_settings().tiers["critical"]
    assert critical.concurrency == 9
    assert critical.prefetch_multiplier == 1  # the rest of the tier is kept


def test_env_list_is_read_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_HANDLER_MODULES", '["a.b"]')
    assert load_settings().handler_modules == ["a.b"]


def test_env_broker_url_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_BROKER_URL", "redis://broker.example:6380/2")
    assert load_settings().effective_broker_url == "redis://broker.example:6380/2"


def test_env_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_PUBLISH_MAX_RETRIES", "4")
    assert load_settings(write(tmp_path, "publish_max_retries = 7\n")).publish_max_retries == 4


def test_keyword_override_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_PUBLISH_MAX_RETRIES", "4")
    assert load_settings(publish_max_retries=1).publish_max_retries == 1


def test_bad_env_value_names_field_value_and_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_TIERS__CRITICAL__CONCURRENCY", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert info.value.fields == ["tiers.critical.concurrency"]
    message = str(info.value)
    assert "'lots'" in message
    assert "from env PIPELINE_TIERS__CRITICAL__CONCURRENCY" in message


def test_non_json_env_value_for_a_list_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPELINE_HANDLER_MODULES", "a.b")
    with pytest.raises(ConfigError, match="PIPELINE_HANDLER_MODULES"):
        load_settings()


def test_bad_file_value_names_field_value_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "publish_max_retries = -3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.fields == ["publish_max_retries"]
    assert "-3" in str(info.value)
    assert f"from {path}" in str(info.value)


def test_every_bad_file_value_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "publish_max_retries = -1\n" + ONE_TIER + "max_retries = -1\n"
                 "[tiers.other]\nsoft_time_limit_s = 100\ntime_limit_s = 90\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert sorted(info.value.fields) == [
        "publish_max_retries", "tiers.only.max_retries", "tiers.other"
    ]


def test_bad_keyword_override_is_not_blamed_on_the_builtin_default() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(publish_max_retries=-1)
    assert "built-in default" not in str(info.value)


def test_unreadable_toml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "tiers = [unclosed"))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "absent.toml")


def test_check_reports_a_rule_naming_an_unknown_tier() -> None:
    settings = load_settings(rules=[Rule(type="a.*", tier="nosuch")])
    assert problem_fields(settings) == ["rules[0].tier"]


def test_check_reports_duplicate_queue_names() -> None:
    tiers = {"a": TierConfig(queue="shared"), "b": TierConfig(queue="shared")}
    settings = load_settings(tiers=tiers, default_tier="a", rules=[])
    assert problem_fields(settings) == ["tiers.b.queue"]


def test_check_reports_a_tier_queue_equal_to_the_dead_letter_queue() -> None:
    settings = load_settings(tiers={"dead_letter": TierConfig()}, default_tier="dead_letter",
                             rules=[])
    assert problem_fields(settings) == ["tiers.dead_letter.queue"]


def test_check_reports_an_unknown_default_tier() -> None:
    assert problem_fields(load_settings(default_tier="nosuch")) == ["default_tier"]


def test_check_reports_a_visibility_timeout_shorter_than_a_tier_needs() -> None:
    settings = load_settings(broker_visibility_timeout_s=20.0)
    problems = check_settings(settings)
    assert {p.field for p in problems} == {"broker_visibility_timeout_s"}
    assert len(problems) == 4  # critical needs 30 s, the others more


def test_check_refuses_a_global_keyprefix_the_lua_steps_would_ignore() -> None:
    settings = load_settings(broker_transport_options={"global_keyprefix": "team1:"})
    assert problem_fields(settings) == ["broker_transport_options.global_keyprefix"]


def test_check_reports_amqp_broker_without_state_url() -> None:
    settings = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//")
    assert problem_fields(settings) == ["state_url"]


def test_amqp_broker_with_a_state_url_is_sound() -> None:
    settings = load_settings(broker_url="amqp://guest:guest@127.0.0.1:5672//",
                             state_url="redis://127.0.0.1:6390/0")
    assert check_settings(settings) == []


def test_check_reports_an_unsupported_broker_scheme() -> None:
    problems = check_settings(load_settings(broker_url="kafka://127.0.0.1:9092"))
    assert [p.field for p in problems] == ["broker_url"]
    assert "'kafka'" in problems[0].message


def test_check_reports_an_unimportable_handler_module() -> None:
    settings = load_settings(handler_modules=["json", "no_such_module_for_pipeline_tests"])
    assert problem_fields(settings, import_handlers=True) == ["handler_modules[1]"]


def test_check_does_not_import_handlers_unless_asked() -> None:
    settings = load_settings(handler_modules=["no_such_module_for_pipeline_tests"])
    assert check_settings(settings) == []
