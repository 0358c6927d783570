"""Tier workers: the Celery worker step that runs the retry mover, and the
command line ``pipeline worker --tier NAME`` turns into.

The step works for plain ``celery -A pipeline.app worker -Q <queue>`` too: it
finds the tier(s) behind the consumed queues, moves their due retries, and
applies the tier's rate limit when the worker serves a single tier, and a worker
that consumes nothing but one tier's queue gets that tier's prefetch and time
limits (:func:`apply_tier`), and its pool unless it needs gevent's patching,
unless its command line gave others (an option given explicitly wins, even when it
equals the app's value; a different pool is logged as a warning), and its startup
banner says which. On Redis it refuses to start a worker of a tier queue whose
priority steps leave some of the sub-lists the pipeline writes to unread (their
work would wait forever).
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import click
from celery import bootsteps
from celery.backends.base import DisabledBackend
from celery.concurrency import get_implementation
from celery.signals import celeryd_init, worker_process_init, worker_ready
from click.core import ParameterSource

from pipeline.config.load import Settings
from pipeline.core.names import BATCH_TASK_NAME, TASK_NAME
from pipeline.core.pools import CELERY_POOL_NAMES, green
from pipeline.worker import adopt
from pipeline.worker.runtime import runtime_for
from pipeline.worker.schedule import RetryMover

__all__ = ["PipelineWorkerStep", "apply_tier", "given_options", "pool_name",
           "refuse_unread_priorities", "share_disabled_backend", "worker_argv"]

log = logging.getLogger(__name__)

EXIT_CONFIG = 2  # a worker refused for its configuration exits with the CLI's config code
# a tier's, unless given (click's parameter names)
TIER_OPTIONS = ("prefetch_multiplier", "time_limit", "soft_time_limit", "pool")
OPTION_KEYS = {"pool": "pool_cls"}  # where a worker built in code passes them, when renamed
GIVEN_ATTR = "pipeline_given_options"  # worker attribute: the TIER_OPTIONS given explicitly
BANNER_LABEL = ".> pipeline:    "  # the line the step adds to the worker's [config] banner


@celeryd_init.connect
def _record_given_options(sender: Any = None, instance: Any = None,
                          options: dict[str, Any] | None = None, **_: Any) -> None:
    """Before the worker resolves its options against the app's conf: which of the
    tier's options its command line (or caller) gave."""
    if instance is not None:
        setattr(instance, GIVEN_ATTR, given_options(options or {},
                                                    click.get_current_context(silent=True)))


@worker_process_init.connect
@worker_ready.connect
def _freeze_startup_heap(**_: Any) -> None:
    """Once a pool child (or the ready worker) has loaded everything: its objects are
    left out of every later garbage collection. A batched child allocates per event,
    and each collection of the oldest generation walked Celery's, pydantic's and the
    handlers' modules again: ~4% of a batch's time. (Nothing is freed any later:
    what is frozen lives as long as the process anyway.)"""
    gc.freeze()


def given_options(options: dict[str, Any], ctx: click.Context | None) -> set[str]:
    """The :data:`TIER_OPTIONS` given explicitly. ``celery worker``'s click command
    fills an absent ``--prefetch-multiplier`` with the app's value, so the value
    cannot tell: the click context's parameter source does. Without a click
    context (a worker built in code), an option passed at all counts as given."""
    given = set()
    for name in TIER_OPTIONS:
        if ctx is not None and name in ctx.params:
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT,
                                                      ParameterSource.DEFAULT_MAP, None):
                given.add(name)
        elif options.get(OPTION_KEYS.get(name, name)) is not None:
            given.add(name)
    return given


class PipelineWorkerStep(bootsteps.StartStopStep):
    """Starts the retry mover for the tier queues this worker consumes."""

    label = "pipeline"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.mover: RetryMover | None = None
        runtime = runtime_for(worker.app)
        settings = runtime.settings
        consumed = list(worker.app.amqp.queues.consume_from or worker.app.amqp.queues)
        self.tiers = [t for q in consumed if (t := settings.tier_for_queue(q)) is not None]
        if self.tiers:  # before the pool forks: its processes inherit the handlers
            runtime.load_handlers()
            share_disabled_backend(worker.app)
        if self.tiers and settings.broker_is_redis:  # read when the consumer connects
            options = dict(worker.app.conf.broker_transport_options or {})
            refuse_unread_priorities(options, [settings.queue_for(t) for t in self.tiers])
            options["lost_after_s"] = min(settings.tier(t).lost_after_s for t in self.tiers)
            worker.app.conf.broker_transport_options = options
        if len(self.tiers) == 1:
            rate = settings.tier(self.tiers[0]).rate_limit
            if rate:
                worker.app.tasks["pipeline.handle"].rate_limit = rate
            if len(set(consumed)) == 1:  # a tier's own worker, however it was started
                said = apply_tier(worker, settings, self.tiers[0])
                log.info("pipeline: %s", said)
                _add_to_banner(worker, said)

    def start(self, worker: Any) -> None:
        if not self.tiers:
            return
        runtime = runtime_for(worker.app)
        settings = runtime.settings
        queues = [settings.queue_for(t) for t in self.tiers]
        self.mover = RetryMover(runtime.schedule, queues,
                                interval_s=settings.retry_poll_interval_s,
                                batch=settings.retry_move_batch)
        self.mover.start()
        if not settings.broker_is_redis:  # the tier queues dead-letter into the DLQ
            runtime.dlq.declare()
        log.info("pipeline: serving tiers %s; moving due retries of %s", self.tiers, queues)

    def stop(self, worker: Any) -> None:
        if self.mover is not None:
            self.mover.stop()

    shutdown = stop


def apply_tier(worker: Any, settings: Settings, tier: str) -> str:
    """Give a worker consuming only ``tier``'s queue the tier's prefetch and time
    limits (as ``pipeline worker --tier`` passes them), unless its command line gave
    them (:func:`given_options`); before the pool and the consumer are built. Says
    what it did."""
    cfg = settings.tier(tier)
    given: set[str] = getattr(worker, GIVEN_ATTR, set())
    said = []
    if "prefetch_multiplier" not in given:
        worker.prefetch_multiplier = cfg.prefetch_multiplier
        said.append(f"prefetch multiplier {cfg.prefetch_multiplier}")
    else:
        said.append(f"prefetch multiplier {worker.prefetch_multiplier} (command line; the "
                    f"tier's is {cfg.prefetch_multiplier})")
    if not given & {"time_limit", "soft_time_limit"}:
        worker.time_limit, worker.soft_time_limit = cfg.time_limit_s, cfg.soft_time_limit_s
    for name in (TASK_NAME, BATCH_TASK_NAME):  # pipeline messages carry them too
        task = worker.app.tasks[name]
        task.time_limit, task.soft_time_limit = cfg.time_limit_s, cfg.soft_time_limit_s
    said.append(f"time limits {cfg.soft_time_limit_s:g} s soft, {cfg.time_limit_s:g} s hard")
    said.append(f"rate limit {cfg.rate_limit or 'none'}")
    said.append(_apply_pool(worker, cfg.pool, given="pool" in given))
    return f"tier {tier!r} worker: {', '.join(said)} (the tier's settings)"


def share_disabled_backend(app: Any) -> None:
    """Give the pipeline's tasks the app's one result backend when it has none.

    Celery keeps a backend not marked thread-safe per thread, in a
    ``threading.local``; under gevent that is per greenlet, and every attempt is a
    new greenlet, so each success built a new ``DisabledBackend`` (configuration
    lookups, a cache) only to mark the task done with it: about 5% of a gevent
    worker's CPU per event. A disabled backend keeps no state, so one serves every
    thread and greenlet. A real result backend is left per thread, as Celery keeps it."""
    backend = app.backend
    if isinstance(backend, DisabledBackend):
        for name in (TASK_NAME, BATCH_TASK_NAME):
            app.tasks[name].backend = backend


def pool_name(pool_cls: Any) -> str:
    """``prefork``, ``threads``, ``gevent`` (or Celery's module name of another pool)."""
    module = str(getattr(pool_cls, "__module__", pool_cls))
    last = module.rsplit(".", 1)[-1]
    return CELERY_POOL_NAMES.get({"thread": "threads"}.get(last, last), module)


def _apply_pool(worker: Any, tier_pool: str, *, given: bool) -> str:
    """The tier's pool for a worker whose command line named none (gevent only when the
    process was started patched: ``-P gevent``, or ``pipeline worker``); says what runs."""
    running = pool_name(worker.pool_cls)
    if running == tier_pool:
        return f"pool {running}"
    if not given and (tier_pool != "gevent" or green()):
        worker.pool_cls = get_implementation(tier_pool)
        return f"pool {tier_pool}"
    why = "command line" if given else \
        "gevent needs -P gevent on the command line, which patches before any import"
    log.warning("pipeline: this worker runs the %s pool (%s); the tier's pool is %s",
                running, why, tier_pool)
    return f"pool {running} ({why}; the tier's is {tier_pool})"


def _add_to_banner(worker: Any, said: str) -> None:
    """Show ``said`` in the ``[config]`` section of the banner ``celery worker``
    prints at start (a worker built in code prints none)."""
    startup_info = getattr(worker, "startup_info", None)
    if startup_info is None:
        return

    def with_tier(artlines: bool = True) -> str:
        lines = startup_info(artlines=artlines).splitlines()
        at = next((i for i, line in enumerate(lines) if ".> task events:" in line), None)
        if at is None:
            return "\n".join([*lines, BANNER_LABEL + said]) + "\n"
        indent = " " * lines[at].index(".>")
        return "\n".join([*lines[:at + 1], indent + BANNER_LABEL + said,
                          *lines[at + 1:]]) + "\n"

    worker.startup_info = with_tier


def refuse_unread_priorities(options: dict[str, Any], queues: list[str]) -> None:
    """Exit (code 2) when a consumer with these transport options would never read
    some priority sub-list of ``queues`` that the pipeline writes to."""
    problem = adopt.priority_problem(options)
    if problem is None:
        return
    log.critical("pipeline: refusing to start a worker of %s: %s", queues, problem)
    raise SystemExit(EXIT_CONFIG)


def worker_argv(settings: Settings, tier: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``celery worker`` arguments for one tier: its queue, pool, concurrency, prefetch
    and time limits, task events on, and a node name that names the tier."""
    cfg = settings.tier(tier)
    argv = [
        "worker",
        "--queues", settings.queue_for(tier),
        "--pool", cfg.pool,
        "--concurrency", str(cfg.concurrency),
        "--prefetch-multiplier", str(cfg.prefetch_multiplier),
        "--time-limit", f"{cfg.time_limit_s:g}",
        "--soft-time-limit", f"{cfg.soft_time_limit_s:g}",
        "--hostname", f"{tier}@%h",
        "--loglevel", "INFO",
    ]
    if cfg.task_events:
        argv.append("--task-events")
    return argv + list(extra)
