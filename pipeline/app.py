"""The Celery app: one queue per tier plus the DLQ, JSON only, late acks.

``celery -A pipeline.app worker -Q critical`` uses ``app``, built from the
settings in the environment at its first use (not on import); with no broker
configured, it joins the stack ``pipeline up`` runs from the state directory
(``$PIPELINE_STATE_DIR``, else ``.pipeline-state`` here), as the CLI does. A team with its own
Celery app calls :func:`attach` instead: the pipeline's task, queues and worker
step are added, their tasks, queues and settings are left as they were. Neither
imports the handler modules: :meth:`pipeline.worker.runtime.Runtime.load_handlers` does,
when a tier worker starts or before the first publish.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

from pipeline.config.discovery import DEFAULT_STATE_DIR, STACK_PID_KEY, StaleStack, adopt_stack
from pipeline.config.load import Settings, check_settings, load_settings
from pipeline.core import logs, softlimit
from pipeline.core.redisurl import redact
from pipeline.dlq import sealing
from pipeline.dlq.dlx import tier_queue_arguments
from pipeline.errors import ConfigError, FieldProblem
from pipeline.observe import metrics
from pipeline.observe.heartbeat import HeartbeatStep
from pipeline.worker import adopt, consumer, fetch
from pipeline.worker.batch import register_batch_task
from pipeline.worker.bootstep import PipelineWorkerStep
from pipeline.worker.runtime import bind
from pipeline.worker.statewatch import StateWatchStep
from pipeline.worker.task import register_task

__all__ = ["app", "attach", "create_app", "tier_queues"]

log = logging.getLogger(__name__)

DEFAULT_CONSUMER = "celery.worker.consumer:Consumer"  # Celery's default worker_consumer
PUBLISH_TIMEOUT_S = 10.0  # socket timeout of publishes, so a dead broker fails fast


def tier_queues(settings: Settings) -> list[Queue]:
    """One durable queue per tier, each with its own direct exchange; on RabbitMQ a
    quorum queue with our delivery limit and dead-letter route (:mod:`pipeline.dlq.dlx`)."""
    queues = []
    for name in settings.tiers:
        q = settings.queue_for(name)
        arguments = None if settings.broker_is_redis else tier_queue_arguments(settings, name)
        queues.append(Queue(q, Exchange(q, "direct", durable=True), routing_key=q,
                            durable=True, queue_arguments=arguments))
    return queues


def transport_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.broker_is_redis:
        options.update(
            visibility_timeout=settings.visibility_timeout_s,
            priority_steps=list(adopt.PIPELINE_PRIORITIES),  # each priority its own sub-list
            socket_timeout=PUBLISH_TIMEOUT_S,
            socket_connect_timeout=PUBLISH_TIMEOUT_S / 2,
        )
    else:
        options.update(confirm_publish=True)
    options.update(settings.broker_transport_options)
    return options


def create_app(settings: Settings | None = None, *, main: str = "pipeline") -> Celery:
    """A new Celery app configured for the pipeline alone."""
    settings = settings or load_settings()
    celery = Celery(main, set_as_current=False)
    celery.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=settings.queue_for(settings.default_tier)
        if settings.default_tier in settings.tiers else "celery",
        task_default_queue_type="classic" if settings.broker_is_redis else "quorum",
        worker_detect_quorum_queues=True,
        # a task keeps running when the consumer's connection drops: its settle is
        # the record, the restored message finds the try running or settled
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=True,
    )
    logs.use_for_celery(celery)  # its workers log JSON lines / console through structlog
    return attach(celery, settings)


def attach(celery: Celery, settings: Settings | None = None) -> Celery:
    """Add the pipeline to an existing Celery ``app``; returns it.

    Adds the tier queues and the ``pipeline.handle`` task, the worker steps that
    move due retries and write heartbeats, the consumer step that pauses
    consumption while the state store is down (RabbitMQ), and the metric and
    log-context signal receivers (they act on ``pipeline.handle`` only).

    The app's broker is the pipeline's: a ``broker_url`` in ``settings`` naming
    another one is refused (:class:`ConfigError`), and the state store is that
    broker unless ``state_url`` is set. The app's own queues, tasks and settings
    stay, except three broker matters on Redis: kombu's ``redis://``, ``rediss://``
    and ``sentinel://`` transports become the pipeline's reliable fetch in this
    process (:func:`pipeline.worker.fetch.install`: kombu's Redis transport with an
    atomic fetch; their tasks gain from it too), the visibility timeout is raised
    (never lowered, kombu's default counting as set) to what the tiers need, and
    the priority steps are set to one per priority 0-9 when the app set none (an
    app that set steps leaving some unread is refused).
    """
    settings = _with_app_broker(celery, settings or load_settings())
    problems = check_settings(settings) + sealing.key_problems(os.environ)
    if settings.broker_is_redis:
        options = dict(celery.conf.broker_transport_options or {})
        if "priority_steps" in options and (problem := adopt.priority_problem(options)):
            problems.append(problem)
        if celery.conf.broker_transport not in (None, "redis", "rediss", "sentinel",
                                                *fetch.ALIASES.values()):
            problems.append(FieldProblem(
                "broker_transport", celery.conf.broker_transport,
                "the pipeline needs its reliable-fetch Redis transport; unset broker_transport"))
    if problems:
        raise ConfigError(problems)

    ours = tier_queues(settings)
    existing = list(celery.conf.task_queues or [])
    default = celery.conf.task_default_queue
    if not existing and default not in {q.name for q in ours}:
        existing = [Queue(default)]  # keep the queue their tasks go to by default
    names = {q.name for q in existing}
    celery.conf.task_queues = existing + [q for q in ours if q.name not in names]

    if settings.broker_is_redis:
        celery.conf.broker_transport_options = _redis_options(
            dict(celery.conf.broker_transport_options or {}), settings)
        fetch.install()  # redis://, rediss://, sentinel:// now fetch reliably in this process
    else:
        _without_native_delayed_delivery(celery, existing)

    register_task(celery)
    register_batch_task(celery)
    celery.steps["worker"].add(PipelineWorkerStep)
    celery.steps["worker"].add(HeartbeatStep)
    celery.steps["consumer"].add(StateWatchStep)  # RabbitMQ: no reject loop while state is down
    metrics.install()  # task and publish metrics from signals (prefork: multiprocess mode)
    logs.install()  # event fields on every log line of a running task
    softlimit.install()  # prefork soft time limits interrupt handlers only
    bind(celery, settings)
    return celery


def _with_app_broker(celery: Celery, settings: Settings) -> Settings:
    """``settings`` on the app's broker (and its transport options, under the
    pipeline's own); a pipeline ``broker_url`` naming another broker is refused.
    An app that names no broker at all is given the pipeline's."""
    app_url = adopt.app_broker_url(celery.conf.broker_url)
    if app_url is None:
        log.warning("the Celery app %r names no broker_url: giving it the pipeline's (%s)",
                    celery.main, redact(settings.effective_broker_url))
        app_url = settings.effective_broker_url
        celery.conf.update(broker_url=app_url)
    problem = adopt.broker_problem(app_url, settings.broker_url)
    if problem is not None:
        raise ConfigError([problem])
    options = {**(celery.conf.broker_transport_options or {}),
               **settings.broker_transport_options}
    return settings.model_copy(update={"broker_url": app_url,
                                       "broker_transport_options": options})


def _without_native_delayed_delivery(celery: Celery, theirs: list[Queue]) -> None:
    """RabbitMQ: no native delayed delivery because of the tier queues (the pipeline
    sends no countdown or ETA messages; :mod:`pipeline.worker.consumer` says why), unless
    the app's own queues are quorum queues or it runs a consumer class of its own."""
    default_type = celery.conf.task_default_queue_type
    quorum = [q.name for q in theirs
              if (q.queue_arguments or {}).get("x-queue-type", default_type) == "quorum"]
    if quorum or celery.conf.worker_consumer != DEFAULT_CONSUMER:
        log.info("keeping Celery's native delayed delivery: the app's quorum queues %s or "
                 "worker_consumer %r need it", quorum, celery.conf.worker_consumer)
        return
    celery.conf.worker_consumer = consumer.CONSUMER_PATH


def _redis_options(options: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The app's Redis transport options with what the tiers need: a visibility
    timeout at least theirs, and a sub-list per priority 0-9 read by every consumer."""
    raised = adopt.raised_visibility(options, settings.visibility_timeout_s)
    if raised is not None:
        log.warning("raising broker visibility_timeout from %ss to %ss for the pipeline",
                    options.get("visibility_timeout", adopt.KOMBU_VISIBILITY_TIMEOUT_S), raised)
        options["visibility_timeout"] = raised
    if "priority_steps" not in options:  # kombu's [0, 3, 6, 9] would leave retries unread
        options["priority_steps"] = list(adopt.PIPELINE_PRIORITIES)
        log.info("setting broker priority_steps to %s: the pipeline writes every priority "
                 "0-9", options["priority_steps"])
    return options


_default: Celery | None = None  # pipeline.app.app, built at first use
if TYPE_CHECKING:
    app: Celery  # provided by __getattr__


def __getattr__(name: str) -> Celery:
    """``pipeline.app.app``: the pipeline's own app, built from the environment at
    first use, so that importing :func:`attach` builds nothing and reads no config."""
    global _default
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _default is None:
        _join_local_stack()
        _default = create_app()
    return _default


def _join_local_stack() -> None:
    """With no broker configured, use the stack ``pipeline up`` runs from the state
    directory, saying so on stderr: a plain ``celery -A pipeline.app worker`` next to
    it would otherwise read ``redis://127.0.0.1:6379/0``, another Redis."""
    try:
        configured = load_settings().broker_url is not None
    except ConfigError:
        return  # create_app reports it
    state_dir = Path(os.environ.get("PIPELINE_STATE_DIR") or DEFAULT_STATE_DIR)
    try:
        adopted = adopt_stack(state_dir, configured)
    except StaleStack as exc:  # the default broker is used, but not silently
        print(f"pipeline: warning: {exc}", file=sys.stderr)
        return
    if adopted is not None:
        path, values = adopted
        print(f"pipeline: using the stack `pipeline up` (pid {values.get(STACK_PID_KEY, '?')}) "
              f"runs from {path}: broker {redact(values.get('PIPELINE_BROKER_URL', '?'))}",
              file=sys.stderr)
