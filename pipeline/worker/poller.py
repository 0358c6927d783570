"""The Redis consumer's poller when the worker has no event loop (the gevent pool).

A gevent worker consumes with Celery's blocking loop, which calls kombu's
``MultiChannelPoller.get`` through ``drain_events``. When every prefetched message
is still running (no QoS credit) kombu registers no fetch and sleeps up to a second
before it looks again, however soon a task finishes: a gevent tier whose
``concurrency x prefetch_multiplier`` messages finish in milliseconds then
handled about one batch per second (40 events in 38 s at credit 2, here).
:class:`Poller` instead waits for the next acknowledgement (the QoS sets
:attr:`Poller.credit`), at most the same second. The event-loop path (prefork,
threads) never calls ``get`` and is unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kredis

__all__ = ["CREDIT_WAIT_MAX_S", "Poller"]

CREDIT_WAIT_MAX_S = 1.0  # longest wait for credit before looking again (kombu's sleep)


class Poller(kredis.MultiChannelPoller):
    """kombu's poller, waiting for credit to return instead of sleeping."""

    def __init__(self) -> None:
        super().__init__()
        self.credit = threading.Event()  # set by every ack/reject (gevent: cooperative)

    def get(self, callback: Callable[..., Any], timeout: float | None = None) -> Any:
        channels: set[Any] = getattr(self, "_channels", set())  # kombu's, untyped
        if channels and not any(c.qos.can_consume() for c in channels):
            self.credit.wait(min(timeout, CREDIT_WAIT_MAX_S) if timeout is not None
                             else CREDIT_WAIT_MAX_S)
        self.credit.clear()
        return super().get(callback, timeout)
