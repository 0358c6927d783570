"""Prometheus metrics that producers and workers record.

Publish outcomes (``pipeline_events_total``) are counted in the state Redis, where
the exporter reads them (:mod:`pipeline.producer.counts`). Workers record from Celery
signals: ``task_prerun`` and ``task_postrun`` run in the prefork *children*,
``task_failure`` for a hard time limit in the worker's main process. Several
processes therefore write the same metrics, which is what prometheus-client's
multiprocess mode is for: start workers (and the exporter that reads their files)
with ``PROMETHEUS_MULTIPROC_DIR`` naming an empty directory.
The broker-side gauges (depth, oldest age, ...) are not recorded here: the
exporter reads them from the broker on each scrape (:mod:`pipeline.observe.exporter`).

``pipeline.handle`` returns how its attempt settled, or raises it for Celery's task
state (:mod:`pipeline.worker.taskstate`); :func:`task_outcome` maps that onto the
``outcome`` label. Every settled task also counts in the per-minute Redis
counters ``pipeline status`` reads (:mod:`pipeline.observe.outcomes`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from typing import Any

from celery import signals
from celery.exceptions import TimeLimitExceeded
from prometheus_client import Counter, Histogram, values

from pipeline.core.names import BATCH_TASK_NAME, TASK_NAME
from pipeline.core.retry import decide
from pipeline.messages.task import ENQUEUED_AT_HEADER
from pipeline.observe import outcomes as rates
from pipeline.observe.outcomes import OutcomeRates
from pipeline.worker.batch import batch_outcomes
from pipeline.worker.runtime import Runtime, runtime_for
from pipeline.worker.task import timeout_settled
from pipeline.worker.taskstate import settled_result


def _process_identifier() -> str:
    """Host and pid: containers reuse pids, so files of workers in several containers
    sharing one multiprocess directory (a compose volume) must not collide."""
    return f"{socket.gethostname()}_{os.getpid()}"


if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # Before any metric exists: prometheus-client keys its files by this identifier.
    values.ValueClass = values.MultiProcessValue(  # type: ignore[no-untyped-call]
        process_identifier=_process_identifier)

__all__ = ["install", "multiprocess_dir", "task_outcome", "timeout_outcome"]

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's multiprocess directory
# Queue wait and end-to-end latency span milliseconds (critical) to hours (bulk).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
HANDLER_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                     30.0, 60.0, 120.0, 300.0)

TASKS = Counter(
    "pipeline_tasks_total", "Settled pipeline.handle attempts, by outcome.",
    ["tier", "handler", "outcome"])
DEAD_LETTERS = Counter(
    "pipeline_dead_letters_total", "DLQ records written, by reason.", ["tier", "reason"])
HANDLER_DURATION = Histogram(
    "pipeline_handler_duration_seconds",
    "Run time of one pipeline.handle attempt (handler and its bookkeeping).",
    ["tier", "handler"], buckets=HANDLER_BUCKETS_S)
QUEUE_WAIT = Histogram(
    "pipeline_queue_wait_seconds",
    "From enqueued (or, for a retry, due) until a worker started the task.",
    ["tier"], buckets=LATENCY_BUCKETS_S)
END_TO_END = Histogram(
    "pipeline_end_to_end_latency_seconds",
    "From the event's acceptance at ingest until its handler succeeded (retries included).",
    ["tier"], buckets=LATENCY_BUCKETS_S)

# (task id, thread) -> monotonic start, in the process running it: under a threads or
# gevent pool two deliveries of one task may run at once (threading ident: greenlet's).
_started: dict[tuple[str, int], float] = {}
_timed_out: OrderedDict[tuple[str, int], None] = OrderedDict()  # recent (task id, attempt)
TIMED_OUT_REMEMBERED = 1000  # hard time limits remembered, to count each once
_installed = False


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process runs in multiprocess mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def install() -> None:
    """Connect the Celery signal receivers and the publish listener (once per process)."""
    global _installed
    if _installed:
        return
    signals.task_prerun.connect(_on_prerun, weak=False)
    signals.task_postrun.connect(_on_postrun, weak=False)
    signals.task_failure.connect(_on_failure, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_process_shutdown.connect(_on_process_shutdown, weak=False)
    _installed = True


def task_outcome(retval: object, state: str) -> tuple[str, str | None]:
    """``(outcome label, dead-letter reason)`` for what ``pipeline.handle`` returned
    or raised (``retval``) with Celery's ``state``.

    RETRY and FAILURE carry the settled outcome (:func:`pipeline.worker.taskstate.settled_result`);
    anything else raised (``Reject``: the attempt could not be settled) is ``failed``.
    """
    settled = settled_result(retval)
    if (settled is retval and state != "SUCCESS") or not isinstance(settled, str):
        return "failed", None
    retval = settled
    if retval == "succeeded":
        return "succeeded", None
    if retval == "retry_scheduled":
        return "retried", None
    if retval.startswith("dead_lettered:"):
        return "dead_lettered", retval.split(":", 1)[1]
    if retval.startswith("deferred:"):  # run again later, no attempt used (budget, breaker)
        return "deferred", None
    if retval in ("already_done", "already_settled", "fanned_out", "rechecked"):
        return retval, None
    return "failed", None


def timeout_outcome(exc: BaseException, *, settled: bool, attempt: int,
                    runtime: Runtime, tier: str) -> tuple[str, str | None]:
    """How the worker's main process settled a hard time limit: the task's
    ``on_failure`` wrote a retry or a DLQ record (``settled``) the way
    :func:`pipeline.core.retry.decide` says, or could not and requeued (``failed``)."""
    if not settled:
        return "failed", None
    decision = decide(exc, attempt=attempt, tier=runtime.settings.tier(tier))
    if decision.retry:
        return "retried", None
    return "dead_lettered", decision.reason.value if decision.reason else ""


def _ours(task: Any) -> Runtime | None:
    if getattr(task, "name", None) not in (TASK_NAME, BATCH_TASK_NAME):
        return None
    try:
        return runtime_for(task.app)
    except RuntimeError:
        return None


def _tier(runtime: Runtime, kwargs: Any) -> str:
    tier = str((kwargs or {}).get("tier", ""))
    return tier if tier in runtime.settings.tiers else runtime.settings.default_tier


def _record(runtime: Runtime, tier: str, handler: str, outcome: str, reason: str | None,
            duration_s: float | None, count: int = 1) -> None:
    TASKS.labels(tier, handler, outcome).inc(count)
    if outcome == "dead_lettered":
        DEAD_LETTERS.labels(tier, reason or "").inc(count)
    if duration_s is not None:
        HANDLER_DURATION.labels(tier, handler).observe(duration_s)
    OutcomeRates(runtime.state).incr(tier, outcome, count=count)


def _on_prerun(task_id: str = "", task: Any = None, kwargs: Any = None, **_: Any) -> None:
    runtime = _ours(task)
    if runtime is None:
        return
    _started[(task_id, threading.get_ident())] = time.monotonic()
    enqueued_at = task.request.get(ENQUEUED_AT_HEADER)
    if isinstance(enqueued_at, int | float):
        QUEUE_WAIT.labels(_tier(runtime, kwargs)).observe(max(0.0, time.time() - enqueued_at))


def _on_postrun(task_id: str = "", task: Any = None, kwargs: Any = None, retval: Any = None,
                state: str = "", **_: Any) -> None:
    runtime = _ours(task)
    if runtime is None:
        return
    started = _started.pop((task_id, threading.get_ident()), None)
    duration_s = time.monotonic() - started if started is not None else None
    tier = _tier(runtime, kwargs)
    handler = str((kwargs or {}).get("handler", ""))
    settled = settled_result(retval)
    if task.name == BATCH_TASK_NAME and isinstance(settled, str):
        for result, count in batch_outcomes(settled):  # one batch message, many events
            outcome, reason = task_outcome(result, "SUCCESS")
            _record(runtime, tier, handler, outcome, reason, None, count)
        if duration_s is not None:
            HANDLER_DURATION.labels(tier, handler).observe(duration_s)
        return
    outcome, reason = task_outcome(retval, state)
    _record(runtime, tier, handler, outcome, reason, duration_s)
    accepted_at = (kwargs or {}).get("accepted_at")
    if outcome == "succeeded" and isinstance(accepted_at, int | float):
        END_TO_END.labels(tier).observe(max(0.0, time.time() - accepted_at))


def _on_failure(sender: Any = None, task_id: str = "", exception: BaseException | None = None,
                kwargs: Any = None, **_: Any) -> None:
    """A hard time limit, seen in the worker's main process after ``on_failure``.

    Celery (5.7) sends ``task_failure`` twice for one hard time limit (from its
    timeout handler, then from the request's failure handler): count it once.
    """
    runtime = _ours(sender)
    if runtime is None or not isinstance(exception, TimeLimitExceeded):
        return
    attempt = int((kwargs or {}).get("attempt", 1))
    if (task_id, attempt) in _timed_out:
        return
    _timed_out[(task_id, attempt)] = None
    if len(_timed_out) > TIMED_OUT_REMEMBERED:
        _timed_out.popitem(last=False)
    tier = _tier(runtime, kwargs)
    outcome, reason = timeout_outcome(
        exception, settled=timeout_settled(task_id),
        attempt=attempt, runtime=runtime, tier=tier)
    _record(runtime, tier, str((kwargs or {}).get("handler", "")), outcome, reason, None)


def _on_process_shutdown(**_: Any) -> None:
    rates.flush()  # a pool process leaves no buffered outcome counts behind


def _on_worker_ready(**_: Any) -> None:
    where = multiprocess_dir()
    if where:
        log.info("metrics: recording into %s (prometheus-client multiprocess mode)", where)
    else:
        log.warning("metrics: %s is not set; task metrics of this worker's pool processes "
                    "are not exported (broker gauges and `pipeline status` still work)",
                    MULTIPROC_ENV)
