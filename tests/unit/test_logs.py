"""Structured logs: JSON lines with the event's fields, never its payload."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from pipeline.core import logs


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    yield
    if logs._handler is not None:
        root.removeHandler(logs._handler)
        logs._handler = None
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_json_when_not_a_terminal_and_console_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    assert logs.wants_json(Stream(tty=False))
    assert not logs.wants_json(Stream(tty=True))
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "json")
    assert logs.wants_json(Stream(tty=True))
    monkeypatch.setenv(logs.LOG_FORMAT_ENV, "console")
    assert not logs.wants_json(Stream(tty=False))


def test_a_line_logged_during_a_task_carries_the_event_fields() -> None:
    stream = Stream(tty=False)
    logs.configure(logging.INFO, stream)
    structlog.contextvars.bind_contextvars(event_id="e-1", type="reward.granted",
                                           tier="critical", task_id="t-1", attempt=2,
                                           handler="credit")
    logging.getLogger("some.handler.module").warning("downstream slow: %d ms", 812)
    (line,) = lines(stream)
    doc = json.loads(line)
    assert list(doc)[:4] == ["timestamp", "level", "logger", "message"]
    assert doc["message"] == "downstream slow: 812 ms"
    assert doc["level"] == "warning"
    assert doc["logger"] == "some.handler.module"
    assert {k: doc[k] for k in logs.EVENT_FIELDS} == {
        "event_id": "e-1", "type": "reward.granted", "tier": "critical", "task_id": "t-1",
        "attempt": 2, "handler": "credit"}
    assert "timestamp" in doc


def test_celerys_task_data_is_reduced_to_the_task_id_and_type_and_the_payload_dropped() -> None:
    stream = Stream(tty=False)
    logs.configure(logging.INFO, stream)
    context = {"id": "t-9", "name": "pipeline.handle[payment.captured]",
               "args": '[{"id": "e-9", "payload": {"card": "4111111111111111"}}]',
               "kwargs": "{}"}
    logging.getLogger("celery.worker.strategy").info(
        "Task %(name)s[%(id)s] received", context, extra={"data": context})
    (line,) = lines(stream)
    doc = json.loads(line)
    assert doc["task_id"] == "t-9"
    assert doc["type"] == "payment.captured"
    assert "4111" not in line
    assert "data" not in doc


def test_allowed_extra_fields_are_kept_and_others_dropped() -> None:
    stream = Stream(tty=False)
    logs.configure(logging.INFO, stream)
    logging.getLogger("pipeline.worker.task").error(
        "dead-lettered", extra={"reason": "permanent_error", "password": "hunter2"})
    doc = json.loads(lines(stream)[0])
    assert doc["reason"] == "permanent_error"
    assert "password" not in doc


def test_console_output_is_readable_text_not_json() -> None:
    stream = Stream(tty=True)
    logs.configure(logging.INFO, stream)
    structlog.contextvars.bind_contextvars(event_id="e-2", tier="bulk")
    logging.getLogger("x").info("hello there")
    (line,) = lines(stream)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", line)  # colours: it is a terminal
    assert not plain.lstrip().startswith("{")
    assert "hello there" in plain
    assert "event_id=e-2" in plain


def test_configuring_twice_keeps_one_handler_and_honours_the_level() -> None:
    first, second = Stream(tty=False), Stream(tty=False)
    logs.configure(logging.INFO, first)
    logs.configure(logging.WARNING, second)
    logging.getLogger("x").info("quiet")
    logging.getLogger("x").warning("loud")
    assert lines(first) == []
    assert [json.loads(line)["message"] for line in lines(second)] == ["loud"]


@pytest.mark.parametrize("tty", [False, True], ids=["json", "console"])
def test_url_passwords_are_masked_in_every_line(tty: bool) -> None:
    stream = Stream(tty=tty)
    logs.configure(logging.INFO, stream)
    log = logging.getLogger("pipeline.producer.enqueue")
    log.error("broker %s unreachable", "redis://:hunter2@broker:6379/0")
    try:
        raise ConnectionError("cannot reach amqp://guest:s3cret@rabbit:5672//")
    except ConnectionError:
        log.exception("publish failed")
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "redis://:***@broker:6379/0" in text
    assert "s3cret" not in text
    assert "amqp://guest:***@rabbit:5672//" in text
