"""Per-app, per-process wiring: settings, state client, retry schedule, DLQ, publisher.

Clients are created lazily and again after a fork, so a prefork child never
shares a socket with its parent. Under a ``threads`` or ``gevent`` pool many attempts
share one runtime at once: each object is created once, under a lock, and what it
holds is safe to share (redis-py clients take a pooled connection per command; the
ledger, breakers, schedule and DLQ keep no per-attempt state, every step of an
attempt being one Lua script). The handler modules (``handler_modules``) are
imported lazily too, by :meth:`Runtime.load_handlers`: when a worker of a tier
queue starts, and before the first publish or replay, never when an app is built
or attached (a handler module may import the very app module that attaches).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from pipeline.core import state
from pipeline.core.handlers import import_handler_modules
from pipeline.dlq.queue import DeadLetterQueue
from pipeline.errors import NotAttached, StateStoreMissing
from pipeline.messages.factory import MessageFactory
from pipeline.producer.publisher import Publisher
from pipeline.worker.breaker import Breakers
from pipeline.worker.ledger import Ledger
from pipeline.worker.schedule import RetrySchedule

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.config.load import Settings

__all__ = ["Runtime", "bind", "runtime_for"]

T = TypeVar("T")
_RUNTIMES: weakref.WeakKeyDictionary[Celery, Runtime] = weakref.WeakKeyDictionary()
_forks = 0  # forks this process descends from: os.getpid() per access was a syscall each


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class Runtime:
    """What tasks, workers and producers of one Celery app share."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._forks = -1  # the process's fork count when its shared objects were made
        self._state: redis.Redis | None = None
        self._schedule: RetrySchedule | None = None
        self._dlq: DeadLetterQueue | None = None
        self._publisher: Publisher | None = None
        self._messages: MessageFactory | None = None
        self._ledger: Ledger | None = None
        self._breakers: Breakers | None = None
        self._handlers_loaded = False
        self._lock = threading.RLock()  # creating a shared object (threads, gevent)

    def load_handlers(self) -> None:
        """Import the ``handler_modules`` (once) so that their ``@handler`` decorators register."""
        with self._lock:
            if not self._handlers_loaded:
                import_handler_modules(self.settings.handler_modules)
                self._handlers_loaded = True

    def _once(self, attr: str, make: Callable[[], T]) -> T:
        """``self.<attr>``, made by ``make`` at its first use in this process, once
        however many threads ask at the same time."""
        self._check_fork()
        value: Any = getattr(self, attr)
        if value is None:
            with self._lock:
                value = getattr(self, attr)
                if value is None:
                    value = make()
                    setattr(self, attr, value)
        return value  # type: ignore[no-any-return]

    def _check_fork(self) -> None:
        if self._forks != _forks:  # new, or inherited through a fork: nothing is shared
            self._lock = threading.RLock()  # a lock held at fork time stays held in the child
            self._forks = _forks
            self._state = None
            self._schedule = None
            self._dlq = None
            self._publisher = None
            self._ledger = None
            self._breakers = None

    @property
    def state(self) -> redis.Redis:
        return self._once("_state", self._connect)

    def _connect(self) -> redis.Redis:
        url = self.settings.effective_state_url
        if url is None:
            raise StateStoreMissing("no state_url configured (required with a RabbitMQ broker)")
        return state.connect(url, self.settings.broker_transport_options)

    @property
    def ledger(self) -> Ledger:
        return self._once("_ledger",
                          lambda: Ledger(self.state, self.settings.idempotency_window_s))

    @property
    def breakers(self) -> Breakers:
        return self._once("_breakers", lambda: Breakers(
            self.state, self.settings.breakers, longest_time_limit_s=max(
                (t.time_limit_s for t in self.settings.tiers.values()), default=None)))

    @property
    def schedule(self) -> RetrySchedule:
        return self._once("_schedule", lambda: RetrySchedule(
            self.app, self.state, atomic_move=self.settings.broker_is_redis,
            redact_paths=self.settings.redact_paths))

    @property
    def dlq(self) -> DeadLetterQueue:
        return self._once("_dlq", lambda: DeadLetterQueue(
            self.app, self.settings, self.state if self.settings.broker_is_redis else None))

    @property
    def messages(self) -> MessageFactory:
        """Task messages of every try (first publish, retry, deferral, replay)."""
        return self._once("_messages", lambda: MessageFactory(self.settings))

    @property
    def publisher(self) -> Publisher:
        return self._once("_publisher", self._make_publisher)

    def _make_publisher(self) -> Publisher:
        self.load_handlers()  # an event becomes one task per registered handler
        return Publisher(self)


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
