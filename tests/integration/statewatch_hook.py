"""Loaded by test workers (``handler_modules``): report state-store failures the way
``pipeline/tasks.py`` is to, i.e. call ``statewatch.report_state_failure(app)``
before ``settle_or_requeue`` rejects a message because the state store failed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from celery.exceptions import Reject

from pipeline import statewatch, tasks

_settle_or_requeue = tasks.settle_or_requeue


def settle_or_requeue(task_id: str, run: Callable[[], str]) -> str:
    try:
        return _settle_or_requeue(task_id, run)
    except Reject as exc:
        if isinstance(exc.reason, redis.RedisError | OSError):
            attempt: Any = getattr(run, "__self__", None)  # run is Attempt.run
            statewatch.report_state_failure(attempt.rt.app)
        raise


tasks.settle_or_requeue = settle_or_requeue
