"""A RabbitMQ queue's depth, read without declaring it: ``None`` when it does not exist.

A passive ``queue.declare`` answers the message count of an existing queue and
closes the channel with ``404 NOT_FOUND`` for a missing one. Tier queues are
declared by their workers, the DLQ by tier workers and the first dead letter, so
right after a deploy (or on a tier nobody serves yet) a queue may not exist: that
is a depth of 0 and a fact worth reporting (``declared: false``), not an error.
"""

from __future__ import annotations

import contextlib
from typing import Any

from amqp.exceptions import NotFound

__all__ = ["passive_depth"]


def passive_depth(connection: Any, queue: str) -> int | None:
    """Messages ready in ``queue`` on ``connection`` (a kombu connection), or ``None``
    if the broker has no such queue. Uses a channel of its own: a 404 closes it."""
    channel = connection.channel()
    try:
        declared = channel.queue_declare(queue, passive=True)
    except NotFound:
        return None
    finally:
        with contextlib.suppress(Exception):  # already closed by the broker's 404
            channel.close()
    return int(declared.message_count)
