"""``pipeline.__all__`` is exactly what the package exports."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pipeline


def defined_public_names() -> set[str]:
    """Public attributes of ``pipeline`` that are pipeline's own objects (not modules,
    not names imported only for annotations such as ``Any``)."""
    return {
        name
        for name, value in vars(pipeline).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and str(getattr(value, "__module__", "")).split(".")[0] == "pipeline"
    }


def test_every_name_in_all_exists() -> None:
    missing = [name for name in pipeline.__all__ if not hasattr(pipeline, name)]
    assert missing == []


def test_all_has_no_duplicates() -> None:
    assert len(pipeline.__all__) == len(set(pipeline.__all__))


def test_all_equals_the_public_names_defined_in_the_package() -> None:
    assert sorted(pipeline.__all__, key=str.casefold) == sorted(
        defined_public_names(), key=str.casefold
    )


def test_publish_is_exported() -> None:
    assert "publish" in pipeline.__all__
    assert callable(pipeline.publish)


DOCS = ["README.md", "docs/adopting.md"]  # what a user copies: public names only


def test_the_readme_and_the_adopting_doc_import_only_the_public_api() -> None:
    root = Path(pipeline.__file__).parent.parent
    for doc in DOCS:
        text = (root / doc).read_text()
        private = re.findall(r"^\s*from pipeline\.[\w.]+ import .*$", text, re.MULTILINE)
        assert private == [], f"{doc} imports from inside the package: {private}"
        for names in re.findall(r"^\s*from pipeline import (.+)$", text, re.MULTILINE):
            for name in (n.strip() for n in names.split(",")):
                assert name in pipeline.__all__, f"{doc} imports {name!r}, not exported"
        for name in re.findall(r"\bpipeline\.(\w+)\(", text):
            assert name in pipeline.__all__, f"{doc} calls pipeline.{name}(), not exported"
