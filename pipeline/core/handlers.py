"""Handler registry: functions that process events of a type.

::

    from pipeline import Event, handler

    class Granted(BaseModel):
        user_id: int
        amount: int

    @handler("reward.granted", model=Granted)
    def credit_wallet(event: Event, payload: Granted) -> None:
        ...

A handler may be an ``async def``: it runs to completion within its attempt, on
its worker thread's event loop, cancelled at the tier's ``soft_time_limit_s``
(:mod:`pipeline.core.eventloop` says which loop under which pool, and why).

An event type with several handlers becomes one task per (event, handler), so a
failing handler never re-runs one that already succeeded. ``model`` is validated
on the worker; a payload that fails it is dead-lettered as ``invalid_payload``.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

from pipeline.core import eventloop, softlimit
from pipeline.core.events import Event
from pipeline.errors import DuplicateHandler, OutsideHandler, UsageError

__all__ = [
    "Handler",
    "HandlerContext",
    "Registry",
    "current",
    "handler",
    "import_handler_modules",
    "registry",
]

F = TypeVar("F", bound=Callable[..., Any])
_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:\-]*$")  # handler names: dotted identifiers


@dataclass(frozen=True)
class Handler:
    """A registered handler: ``pattern`` is an event type or a glob (``game.*``)."""

    name: str
    pattern: str
    func: Callable[..., Any]
    model: type[BaseModel] | None = None
    downstreams: tuple[str, ...] = ()  # circuit breakers this handler's calls go through
    batchable: bool = True  # False: never run as part of a packed batch message

    def handles(self, event_type: str) -> bool:
        """Whether this handler is registered for ``event_type`` (its pattern matches)."""
        return fnmatch.fnmatchcase(event_type, self.pattern)

    def __call__(self, event: Event, *, timeout_s: float | None = None) -> Any:
        """Run the handler; an async one's coroutine to completion, cancelled at
        ``timeout_s`` (``SoftTimeLimitExceeded``)."""
        with softlimit.interruptible():  # a prefork soft limit raises here, not in a settle
            if self.model is None:
                result = self.func(event)
            else:
                result = self.func(event, self.model.model_validate(event.payload))
            if inspect.iscoroutine(result):  # the limit cancels it instead
                return eventloop.run(result, timeout_s)
            return result


class Registry:
    """Handlers by name, looked up by event type (exact names and globs)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Handler] = {}
        self._by_type: dict[str, list[Handler]] = {}  # lookup cache, cleared on change

    def register(self, entry: Handler) -> Handler:
        self._by_type.clear()
        if not _NAME_PATTERN.match(entry.name):
            raise UsageError(f"handler name {entry.name!r} must be a dotted identifier")
        existing = self._by_name.get(entry.name)
        if existing is not None and existing.func is not entry.func:
            if _same_function(existing.func, entry.func):
                self._by_name[entry.name] = entry  # module re-imported (e.g. as __main__)
                return entry
            raise DuplicateHandler(f"handler name {entry.name!r} is already registered")
        self._by_name[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._by_name.pop(name, None)
        self._by_type.clear()

    def get(self, name: str) -> Handler | None:
        return self._by_name.get(name)

    def for_type(self, event_type: str) -> list[Handler]:
        found = self._by_type.get(event_type)
        if found is None:
            found = [h for h in self._by_name.values() if h.handles(event_type)]
            if len(self._by_type) < _TYPE_CACHE_MAX_ENTRIES:
                self._by_type[event_type] = found
        return list(found)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)


_TYPE_CACHE_MAX_ENTRIES = 10_000  # event types whose handler lists are cached

registry = Registry()  # the process-wide registry the decorator writes to


def handler(
    event_type: str,
    *,
    model: type[BaseModel] | None = None,
    name: str | None = None,
    downstreams: Iterable[str] = (),
    batchable: bool = True,
) -> Callable[[F], F]:
    """Register the decorated function for ``event_type`` (exact type or glob).

    ``name`` defaults to ``module.function`` and is what DLQ records and metrics
    show; keep it stable across deploys, since pending retries refer to it.
    ``downstreams`` names the circuit breakers its calls go through (configured in
    ``[breakers.NAME]``); ``batchable=False`` keeps it off batched tiers.
    """

    def decorate(func: F) -> F:
        registry.register(
            Handler(
                name=name or _default_name(func),
                pattern=event_type,
                func=func,
                model=model,
                downstreams=tuple(downstreams),
                batchable=batchable,
            )
        )
        return func

    return decorate


@dataclass(frozen=True)
class HandlerContext:
    """Where the running handler stands: read it with :func:`current`."""

    task_id: str
    handler: str
    tier: str
    attempt: int  # 1 for the first try
    max_attempts: int
    state: Any  # the pipeline's Redis client (redis.Redis)


_current: ContextVar[HandlerContext | None] = ContextVar("pipeline_handler", default=None)


def current() -> HandlerContext:
    """The context of the handler running now; raises outside a handler."""
    ctx = _current.get()
    if ctx is None:
        raise OutsideHandler("pipeline.current() called outside a running handler")
    return ctx


class running:  # noqa: N801 - used as a function: ``with running(ctx):``
    """The block where ``ctx``'s handler runs (:func:`current` answers ``ctx``). A
    class, not a generator: a batch enters one per event."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: HandlerContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> HandlerContext:
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(self, *_: object) -> None:
        _current.reset(self._token)


def import_handler_modules(modules: Iterable[str]) -> None:
    """Import each module so its ``@handler`` decorators register."""
    for module in modules:
        importlib.import_module(module)


def _default_name(func: Callable[..., Any]) -> str:
    qualname = getattr(func, "__qualname__", getattr(func, "__name__", "handler"))
    return f"{func.__module__}.{qualname.replace('<locals>.', '')}"


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same source function imported twice (e.g. as ``__main__`` and by name)."""

    def where(f: Callable[..., Any]) -> tuple[object, ...] | None:
        code = getattr(f, "__code__", None)
        if code is None:
            return None
        return (f.__qualname__, code.co_filename, code.co_firstlineno)

    here = where(a)
    return here is not None and here == where(b)
