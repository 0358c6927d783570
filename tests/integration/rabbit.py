"""RabbitMQ test helpers: the broker URL, a skip when it is down, queue names of a
run's own (deleted afterwards), and reading a queue without consuming it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from tests.integration.support import write_config

AMQP_URL = os.environ.get("PIPELINE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
TIERS = ("critical", "standard", "bulk")


def require_rabbitmq() -> None:
    """Skip when RabbitMQ is unreachable (fail under ``CI``)."""
    try:
        with Connection(AMQP_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception:
        if os.environ.get("CI"):
            pytest.fail(f"RabbitMQ unreachable at {AMQP_URL} under CI")
        pytest.skip(f"RabbitMQ unreachable at {AMQP_URL}")


def rabbit_config(path: Path, prefix: str, extra: str = "") -> Path:
    """The test config with this run's queue names, DLQ included."""
    config = write_config(path, prefix=prefix, extra=extra)
    # dead_letter_queue is a top-level key: it must come before the first table.
    config.write_text(f'dead_letter_queue = "{prefix}dead_letter"\n' + config.read_text())
    return config


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}-"


def delete_queues(prefix: str, names: tuple[str, ...] = (*TIERS, "dead_letter")) -> None:
    """Delete this run's queues and their exchanges; a missing one is fine."""
    with Connection(AMQP_URL) as conn:
        channel: Any = conn.channel()
        for name in names:
            for delete in (channel.queue_delete, channel.exchange_delete):
                try:
                    delete(f"{prefix}{name}")
                except Exception:
                    channel = conn.channel()


@contextlib.contextmanager
def peek(queue: str) -> Iterator[list[Any]]:
    """Every message of ``queue`` fetched unacknowledged; they go back when the block ends."""
    with Connection(AMQP_URL) as conn:
        channel: Any = conn.channel()
        messages = []
        try:
            while (message := channel.basic_get(queue, no_ack=False)) is not None:
                messages.append(message)
            yield messages
        finally:
            channel.close()


def queued_task_ids(queue: str) -> list[str]:
    """Celery task ids of the messages waiting in ``queue``."""
    with peek(queue) as messages:
        return [str(m.headers["id"]) for m in messages]
