"""What publishing needs of its app's per-process wiring, stated as a protocol so that
the producer depends on no worker code: :class:`pipeline.worker.runtime.Runtime`
provides it (and more, for the worker and the DLQ).
"""

from __future__ import annotations

from typing import Protocol

import redis
from celery import Celery

from pipeline.config.model import Settings

__all__ = ["ProducerWiring"]


class ProducerWiring(Protocol):
    """An app, its settings and the state store's client (created once per process)."""

    @property
    def app(self) -> Celery: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def state(self) -> redis.Redis: ...
