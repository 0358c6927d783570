"""``pipeline flower``: Flower for the pipeline's app, never open by accident.

Authentication is required: HTTP basic auth from ``PIPELINE_FLOWER_BASIC_AUTH``
(``user:password[,user2:password2]``, handed to Flower through its own
``FLOWER_BASIC_AUTH`` inside this process, so no password shows in ``ps``), or
Flower's OAuth options passed through (``--auth=REGEX --auth_provider=...``
with ``FLOWER_OAUTH2_KEY``/``_SECRET``/``_REDIRECT_URI``). Without either it
refuses to start, unless ``--insecure-local``: loopback only, with a warning.

Two things Flower does not do on its own:

* its Broker tab lists only the queues online workers consume, so a tier whose
  workers are all down (the moment its depth matters most) and the DLQ (nobody
  consumes it) would vanish: :func:`list_every_queue` adds every tier queue and
  the DLQ to the list;
* its task list hides task arguments by default: ``args`` (which start with the
  event's id and type) is added to the columns, next to the task name
  ``pipeline.handle[<event type>]`` (the messages' Celery ``shadow`` name), and so
  is ``exception``: why a task is RETRY or FAILURE (:mod:`pipeline.worker.taskstate`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.errors import NO_VALUE, ConfigError, FieldProblem

__all__ = ["BASIC_AUTH_ENV", "DEFAULT_PORT", "auth_mode", "flower_argv", "list_every_queue",
           "parse_basic_auth"]

log = logging.getLogger(__name__)

BASIC_AUTH_ENV = "PIPELINE_FLOWER_BASIC_AUTH"  # "user:password[,user2:password2]"
DEFAULT_PORT = 5555  # Flower's own default port
TASK_COLUMNS = "name,uuid,state,exception,args,received,started,runtime,worker"  # its /tasks page
_FLOWER_AUTH_OPTIONS = ("--auth=", "--auth_provider=", "--auth-provider=")  # OAuth pass-through
_FLOWER_BASIC_OPTIONS = ("--basic_auth=", "--basic-auth=")  # discouraged: visible in ps


def parse_basic_auth(value: str) -> list[str]:
    """The ``user:password`` entries of ``value``; raises ConfigError naming (by
    position, never by content) an entry without a user or a password."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        raise ConfigError([FieldProblem(BASIC_AUTH_ENV, NO_VALUE, "is empty")])
    for i, entry in enumerate(entries, start=1):
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise ConfigError([FieldProblem(BASIC_AUTH_ENV, NO_VALUE,
                                              f"entry {i} is not 'user:password'")])
    return entries


def auth_mode(env: Mapping[str, str], extra: Sequence[str]) -> str | None:
    """``"basic"``, ``"oauth"`` or None (no authentication configured)."""
    if env.get(BASIC_AUTH_ENV) or env.get("FLOWER_BASIC_AUTH") or any(
            a.startswith(_FLOWER_BASIC_OPTIONS) for a in extra):
        return "basic"
    if env.get("FLOWER_AUTH") or any(a.startswith(_FLOWER_AUTH_OPTIONS) for a in extra):
        return "oauth"
    return None


def flower_argv(*, host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """``celery flower`` arguments: address, port, the task columns, then ``extra``."""
    argv = ["flower", f"--address={host}", f"--port={port}"]
    if not any(a.startswith(("--tasks_columns", "--tasks-columns")) for a in extra):
        argv.append(f"--tasks_columns={TASK_COLUMNS}")
    return argv + list(extra)


def list_every_queue(queues: Sequence[str]) -> None:
    """Make Flower's Broker tab and ``/api/queues/length`` list ``queues`` too,
    besides those the online workers consume."""
    try:
        from flower.views import BaseHandler  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - flower is a dependency
        return
    original = getattr(BaseHandler, "get_active_queue_names", None)
    if original is None or getattr(original, "_pipeline", False):
        if original is None:
            log.warning("this Flower version has no get_active_queue_names; the Broker tab "
                        "lists only queues that online workers consume")
        return
    extra = set(queues)

    def get_active_queue_names(self: Any) -> list[str]:
        return sorted(set(original(self)) | extra)

    get_active_queue_names._pipeline = True  # type: ignore[attr-defined]
    BaseHandler.get_active_queue_names = get_active_queue_names


def prepare_environment(*, basic_auth: str | None, insecure_local: bool) -> None:
    """Hand the credentials to Flower inside this process (never on a command line)."""
    if basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = ",".join(parse_basic_auth(basic_auth))
    if insecure_local:
        os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
