"""Per-app, per-process wiring: settings, state client, retry schedule, DLQ, publisher.

Clients are created lazily and again after a fork, so a prefork child never
shares a socket with its parent. The handler modules (``handler_modules``) are
imported lazily too, by :meth:`Runtime.load_handlers`: when a worker of a tier
queue starts, and before the first publish or replay, never when an app is built
or attached (a handler module may import the very app module that attaches).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING

import redis

from pipeline import state
from pipeline.breaker import Breakers
from pipeline.deadletter import DeadLetterQueue
from pipeline.errors import NotAttached, StateStoreMissing
from pipeline.handlers import import_handler_modules
from pipeline.ledger import Ledger
from pipeline.schedule import RetrySchedule

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.config import Settings
    from pipeline.ingest import Publisher

__all__ = ["Runtime", "bind", "runtime_for"]

_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()


class Runtime:
    """What tasks, workers and producers of one Celery app share."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._pid = -1
        self._state: redis.Redis | None = None
        self._schedule: RetrySchedule | None = None
        self._dlq: DeadLetterQueue | None = None
        self._publisher: Publisher | None = None
        self._ledger: Ledger | None = None
        self._breakers: Breakers | None = None
        self._handlers_loaded = False

    def load_handlers(self) -> None:
        """Import the ``handler_modules`` (once) so that their ``@handler`` decorators register."""
        if not self._handlers_loaded:
            import_handler_modules(self.settings.handler_modules)
            self._handlers_loaded = True

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._state = None
            self._schedule = None
            self._dlq = None
            self._publisher = None
            self._ledger = None
            self._breakers = None

    @property
    def state(self) -> redis.Redis:
        self._check_fork()
        if self._state is None:
            url = self.settings.effective_state_url
            if url is None:
                raise StateStoreMissing("no state_url configured (required with a RabbitMQ broker)")
            self._state = state.connect(url, self.settings.broker_transport_options)
        return self._state

    @property
    def ledger(self) -> Ledger:
        self._check_fork()
        if self._ledger is None:
            self._ledger = Ledger(self.state, self.settings.idempotency_window_s)
        return self._ledger

    @property
    def breakers(self) -> Breakers:
        self._check_fork()
        if self._breakers is None:
            longest_s = max((t.time_limit_s for t in self.settings.tiers.values()), default=None)
            self._breakers = Breakers(self.state, self.settings.breakers,
                                      longest_time_limit_s=longest_s)
        return self._breakers

    @property
    def schedule(self) -> RetrySchedule:
        self._check_fork()
        if self._schedule is None:
            self._schedule = RetrySchedule(
                self.app, self.state, atomic_move=self.settings.broker_is_redis,
                redact_paths=self.settings.redact_paths)
        return self._schedule

    @property
    def dlq(self) -> DeadLetterQueue:
        self._check_fork()
        if self._dlq is None:
            client = self.state if self.settings.broker_is_redis else None
            self._dlq = DeadLetterQueue(self.app, self.settings, client)
        return self._dlq

    @property
    def publisher(self) -> Publisher:
        from pipeline.ingest import Publisher

        self._check_fork()
        if self._publisher is None:
            self.load_handlers()  # an event becomes one task per registered handler
            self._publisher = Publisher(self)
        return self._publisher


def bind(app: Celery, settings: Settings) -> Runtime:
    runtime = Runtime(app, settings)
    _RUNTIMES[app] = runtime
    return runtime


def runtime_for(app: Celery) -> Runtime:
    try:
        return _RUNTIMES[app]
    except KeyError:
        raise NotAttached(
            f"Celery app {app.main!r} has no pipeline attached: call pipeline.attach(app)"
        ) from None
