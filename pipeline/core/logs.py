"""Structured logs: JSON lines in production, readable lines on a terminal.

Everything goes through the standard library's ``logging`` (Celery's loggers, ours,
a handler author's) and is rendered by one structlog ``ProcessorFormatter`` on the
root logger. The format is JSON unless the stream is a terminal;
``PIPELINE_LOG_FORMAT=json|console`` overrides that.

While ``pipeline.handle`` runs, ``event_id``, ``type``, ``tier``, ``task_id``,
``attempt`` and ``handler`` are bound as context variables (Celery's
``task_prerun``/``task_postrun`` signals), so every line logged during the task,
by anyone, carries them. Context variables are per thread and per greenlet, so
under a ``threads`` or ``gevent`` pool each attempt's lines carry its own fields:
``task_postrun`` resets exactly what its ``task_prerun`` set, in the same thread.
Only an allow-list of ``extra`` fields is copied into a
line: Celery attaches the task's full arguments (the event and its payload) to
its own records as ``extra={"data": ...}``, and a payload may hold secrets. The
password of every URL in a line (a broker URL in an error) is masked.

Celery workers of the pipeline's own app (:func:`pipeline.app.create_app`) log
this way; a team's app that only :func:`~pipeline.app.attach`\\es the pipeline
keeps its own logging unless it calls :func:`use_for_celery`.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol, TextIO

import structlog
from celery import signals
from structlog.typing import EventDict, Processor, WrappedLogger

from pipeline.core.names import TASK_NAME
from pipeline.core.redisurl import mask_urls

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["EVENT_FIELDS", "LOG_FORMAT_ENV", "attempt_fields", "configure", "install",
           "use_for_celery", "wants_json"]

LOG_FORMAT_ENV = "PIPELINE_LOG_FORMAT"  # "json" or "console"; unset: console on a terminal
EVENT_FIELDS = ("event_id", "type", "tier", "task_id", "attempt", "handler")
# ``extra`` fields copied into a line (never Celery's "data": it holds the payload).
EXTRA_ALLOWED = (*EVENT_FIELDS, "reason", "exception", "delay_s", "outcome", "why", "queue",
                 "moved")

_handler: logging.Handler | None = None
_celery_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_installed = False
# the tokens of what _bind_task set in this context, for _unbind_task to reset
_bound: ContextVar[Mapping[str, Token[Any]] | None] = ContextVar("pipeline_log_bound",
                                                                 default=None)


class _AttemptLike(Protocol):
    event: dict[str, Any]
    tier: str
    task_id: str
    attempt: int
    handler: str


def attempt_fields(attempt: _AttemptLike, **more: Any) -> dict[str, Any]:
    """``extra=`` for a log call about one attempt: the event fields and ``more``
    (for lines logged outside a task run, e.g. after a hard time limit)."""
    return {"event_id": attempt.event.get("id"), "type": attempt.event.get("type"),
            "tier": attempt.tier, "task_id": attempt.task_id, "attempt": attempt.attempt,
            "handler": attempt.handler or None, **more}


def wants_json(stream: TextIO) -> bool:
    """JSON unless ``stream`` is a terminal; ``PIPELINE_LOG_FORMAT`` decides first."""
    chosen = os.environ.get(LOG_FORMAT_ENV, "").strip().lower()
    if chosen in ("json", "console"):
        return chosen == "json"
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def _from_celery_record(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """Celery's task log records carry the task in ``record.data``: keep its id and
    the event type from its (shadow) name, drop the rest."""
    data = getattr(event_dict.get("_record"), "data", None)
    if isinstance(data, dict):
        if data.get("id"):
            event_dict.setdefault("task_id", data["id"])
        task_name = str(data.get("name", ""))
        if task_name.startswith(f"{TASK_NAME}[") and task_name.endswith("]"):
            event_dict.setdefault("type", task_name[len(TASK_NAME) + 1:-1])
    return event_dict


_LEADING_KEYS = ("timestamp", "level", "logger", "message", *EVENT_FIELDS)  # JSON key order


def _leading_keys_first(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """Timestamp, level, logger, message and the event's fields first: lines read
    the same way in a terminal pager as in a log viewer."""
    ordered = {k: event_dict.pop(k) for k in _LEADING_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _mask_url_credentials(logger: WrappedLogger, name: str,
                          event_dict: EventDict) -> EventDict:
    """Every text value of the line (message, exception, fields) without URL passwords."""
    for key, value in event_dict.items():
        if isinstance(value, str) and "://" in value:
            event_dict[key] = mask_urls(value)
    return event_dict


def _shared() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure(level: int | str = logging.INFO, stream: TextIO | None = None) -> None:
    """Route all logging to ``stream`` (stderr) through structlog; idempotent."""
    global _handler
    stream = stream or sys.stderr
    renderer: list[Processor] = (
        [structlog.processors.format_exc_info, _mask_url_credentials,
         structlog.processors.EventRenamer("message"), _leading_keys_first,
         structlog.processors.JSONRenderer(default=str)]
        if wants_json(stream) else [structlog.processors.format_exc_info, _mask_url_credentials,
                                    structlog.dev.ConsoleRenderer(colors=_isatty(stream))])
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared(), structlog.stdlib.ExtraAdder(EXTRA_ALLOWED),
                           _from_celery_record],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(level)
    _handler = handler
    structlog.configure(
        processors=[*_shared(), structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def install() -> None:
    """Bind the event's fields for the duration of each ``pipeline.handle`` run."""
    global _installed
    if _installed:
        return
    # create structlog's variables now, in one thread: two threads binding a field
    # first at the same moment would each make one, and one would never be unbound
    structlog.contextvars.reset_contextvars(
        **structlog.contextvars.bind_contextvars(**dict.fromkeys(EVENT_FIELDS)))
    signals.task_prerun.connect(_bind_task, weak=False)
    signals.task_postrun.connect(_unbind_task, weak=False)
    signals.celeryd_init.connect(_on_celeryd_init, weak=False)
    _installed = True


def use_for_celery(app: Celery) -> None:
    """Let a worker of ``app`` log through :func:`configure` (Celery's ``setup_logging``)."""
    install()
    _celery_apps.add(app)


def _bind_task(task_id: str = "", task: Any = None, args: Any = None, kwargs: Any = None,
               **_: Any) -> None:
    if getattr(task, "name", None) != TASK_NAME:
        return
    event = args[0] if args and isinstance(args[0], dict) else {}
    kw = kwargs or {}
    _bound.set(structlog.contextvars.bind_contextvars(
        event_id=event.get("id"), type=event.get("type"), tier=kw.get("tier"),
        task_id=task_id, attempt=kw.get("attempt", 1), handler=kw.get("handler") or None))


def _unbind_task(task: Any = None, **_: Any) -> None:
    if getattr(task, "name", None) != TASK_NAME:
        return
    tokens = _bound.get()
    if tokens is not None:
        _bound.set(None)
        try:
            structlog.contextvars.reset_contextvars(**tokens)
            return
        except ValueError:  # set in another context (not Celery's order): unbind instead
            pass
    structlog.contextvars.unbind_contextvars(*EVENT_FIELDS)


def _on_celeryd_init(instance: Any = None, **_: Any) -> None:
    """A worker is starting: if it runs one of our apps, take over its logging setup
    (in the main process and, through the inherited receiver, in pool children)."""
    if getattr(instance, "app", None) in _celery_apps:
        signals.setup_logging.connect(_setup_logging, weak=False)


def _setup_logging(loglevel: int | str | None = None, logfile: str | None = None,
                   **_: Any) -> None:
    stream = open(logfile, "a", buffering=1) if logfile else (sys.__stderr__ or sys.stderr)  # noqa: SIM115
    configure(loglevel or logging.INFO, stream)
