"""Every list of DLQ reasons (CLI, HTTP filters, docs) is the code's: ``Reason``."""

from __future__ import annotations

import re
from pathlib import Path

import click
from fastapi import FastAPI

from pipeline.cli.dlq import dlq_list, dlq_purge, dlq_replay, dlq_stats
from pipeline.core.retry import Reason
from pipeline.http.dlq import add_dlq_routes

ROOT = Path(__file__).resolve().parents[2]
REASONS = {r.value for r in Reason}


def test_the_cli_accepts_every_reason() -> None:
    for command in (dlq_list, dlq_stats, dlq_replay, dlq_purge):
        (option,) = [p for p in command.params if p.name == "reason"]
        assert isinstance(option.type, click.Choice)
        assert set(option.type.choices) == REASONS, command.name
    assert "expired" in REASONS


def test_the_http_filters_accept_every_reason() -> None:
    api = FastAPI()
    add_dlq_routes(api.router)
    spec = api.openapi()
    query = next(p for p in spec["paths"]["/dlq"]["get"]["parameters"] if p["name"] == "reason")
    body = spec["components"]["schemas"]["Reason"]
    assert set(body["enum"]) == REASONS
    assert query["schema"]["anyOf"][0]["$ref"].endswith("/Reason")


def documented(path: str, after: str) -> set[str]:
    """The backticked names of the first line-run after ``after`` up to a ``)`` or ``|``."""
    text = (ROOT / path).read_text()
    start = text.index(after) + len(after)
    end = min(i for i in (text.find(")", start), text.find(" |", start)) if i > 0)
    return set(re.findall(r"`([a-z_]+)`", text[start:end]))


def test_the_docs_list_every_reason() -> None:
    assert documented("docs/dlq.md", "reason\n(") == REASONS
    assert documented("docs/observability.md", "DLQ records written:") == REASONS
