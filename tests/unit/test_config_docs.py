"""docs/configuration.md is generated from the settings models and must stay in sync."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from pipeline.config.load import Settings, load_settings
from pipeline.config.model import BreakerConfig
from pipeline.core.tiers import Rule, TierConfig
from pipeline.core.tokens import ApiToken
from pipeline.core.webhooks import WebhookConfig
from tools import docgen

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_up_to_date() -> None:
    current, fresh = docgen.render(DOC)
    if current != fresh:
        diff = "".join(difflib.unified_diff(
            current.splitlines(keepends=True), fresh.splitlines(keepends=True),
            "docs/configuration.md", "regenerated", n=1))
        pytest.fail(
            "docs/configuration.md is out of date with the settings models or "
            f"default.toml; regenerate it with `{docgen.REGENERATE}` (from the repository "
            f"root) and commit the result.\n{diff[:4000]}",
            pytrace=False,
        )


@pytest.mark.parametrize("model", [Settings, TierConfig, BreakerConfig, Rule, ApiToken,
                                   WebhookConfig])
def test_every_setting_has_a_meaning_and_a_row(model: type[BaseModel]) -> None:
    docs = docgen.field_docs(model)
    text = DOC.read_text()
    for name in model.model_fields:
        assert docs[name].strip(), name
        assert f"| `{name}` |" in text, f"{model.__name__}.{name} missing from the reference"


class _Documented(BaseModel):
    #: first line
    #: second line
    a: int = 1
    # an ordinary comment is not documentation
    #: only this
    b: int = 2


class _Undocumented(BaseModel):
    #: fine
    a: int = 1
    b: int = 2


def test_meanings_are_the_comment_lines_directly_above_a_field() -> None:
    assert docgen.field_docs(_Documented) == {"a": "first line second line", "b": "only this"}


def test_an_undocumented_field_is_an_error_naming_it_and_the_command() -> None:
    with pytest.raises(docgen.DocError, match=r"_Undocumented: .* for b; .*tools\.docgen"):
        docgen.field_docs(_Undocumented)


def test_check_mode_reports_a_stale_document(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(DOC.read_text().replace("| `open_s` |", "| `open_s_old` |"))
    assert docgen.main([str(stale), "--check"]) == 1
    assert "run `python -m tools.docgen`" in capsys.readouterr().err
    assert docgen.main([str(stale)]) == 0
    assert stale.read_text() == DOC.read_text()


@pytest.mark.parametrize(
    ("variable", "value", "read"),
    [
        ("PIPELINE_TIERS__BULK__CONCURRENCY", "9", lambda s: s.tiers["bulk"].concurrency),
        ("PIPELINE_BREAKERS__DEMO-API__OPEN_S", "5", lambda s: s.breakers["demo-api"].open_s),
        ("PIPELINE_RETRY_MOVE_BATCH", "7", lambda s: s.retry_move_batch),
    ],
)
def test_the_documented_environment_variables_work(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
    read: Callable[[Settings], float]
) -> None:
    monkeypatch.delenv("PIPELINE_CONFIG", raising=False)
    monkeypatch.setenv(variable, value)
    settings = load_settings()
    assert read(settings) == float(value)
    assert len(settings.tiers) == 4  # layered over the built-in tiers, not replacing them
