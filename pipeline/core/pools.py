"""Worker pools: which Celery pool runs a tier's attempts, and what each can promise.

A tier runs on ``prefork`` (the default: ``concurrency`` processes), ``threads``
(``concurrency`` threads in one process) or ``gevent`` (``concurrency`` greenlets in
one process, the standard library monkey-patched before anything else is imported).

What the pools can enforce differs, and the promise leans on it: a try whose
delivery runs past its tier's hard time limit (plus a margin) is judged lost and run
again. Prefork kills the child at ``time_limit_s``. The thread pool enforces no time
limit at all, soft or hard. Gevent raises its hard limit inside the greenlet only at
the handler's next cooperative switch (I/O, sleep): a CPU-bound stretch runs on, and
the soft limit is never raised. So a ``threads`` or ``gevent`` tier must say, with
``accept_unenforced_time_limit = true``, that its handlers' own calls carry timeouts
that end them before ``time_limit_s``; async handlers are also cancelled by the
pipeline at ``soft_time_limit_s`` (:mod:`pipeline.core.handlers`).

Pure except :func:`gevent_installed` (an import lookup) and :func:`green`.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Literal

from pipeline.errors import FieldProblem

__all__ = ["CELERY_POOL_NAMES", "GEVENT_BOOT", "GEVENT_EXTRA", "POOLS", "Pool", "cli_pool",
           "gevent_installed", "green",
           "pool_problems", "processes"]

Pool = Literal["prefork", "threads", "gevent"]
POOLS: tuple[Pool, ...] = ("prefork", "threads", "gevent")
GEVENT_EXTRA = "celery-event-pipeline[gevent]"  # what to install for gevent tiers
# ``python -c`` program of a gevent tier worker: patch first, then the CLI as usual.
GEVENT_BOOT = ("import sys; from gevent import monkey; monkey.patch_all(); "
               "from pipeline.cli import main; sys.argv[0] = 'pipeline'; main()")
# Celery's spellings of the pools, as ``-P`` takes them and ``worker.pool_cls`` names them.
CELERY_POOL_NAMES: dict[str, Pool] = {"prefork": "prefork", "processes": "prefork",
                                      "threads": "threads", "gevent": "gevent"}


def processes(pool: Pool, concurrency: int) -> int:
    """Processes a worker of this pool runs attempts in (what a per-worker rate limit is
    shared over): ``concurrency`` for prefork, one for threads and gevent."""
    return concurrency if pool == "prefork" else 1


def gevent_installed() -> bool:
    return importlib.util.find_spec("gevent") is not None


def green() -> bool:
    """This process runs under gevent's monkey-patching (a gevent pool worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def cli_pool(argv: Sequence[str]) -> str | None:
    """The pool named by ``-P``/``--pool`` in ``celery worker`` arguments, if any."""
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg.startswith("-P") and len(arg) > 2:
            return arg[2:]
    return None


def pool_problems(tier: str, pool: Pool, *, acknowledged: bool, time_limit_s: float,
                  gevent_available: bool) -> list[FieldProblem]:
    """What cannot work in a tier's pool: gevent without gevent installed, and a hard
    time limit the pool cannot enforce that the tier has not acknowledged."""
    problems = []
    if pool == "gevent" and not gevent_available:
        problems.append(FieldProblem(
            f"tiers.{tier}.pool", pool,
            f"the gevent package is not installed: pip install '{GEVENT_EXTRA}'"))
    if pool != "prefork" and not acknowledged:
        why = ("the thread pool enforces no time limit, soft or hard: a synchronous "
               "handler runs until it returns, for ever if one of its calls never does, "
               "holding one of the tier's threads" if pool == "threads"
               else "gevent never raises soft_time_limit_s and raises time_limit_s only at "
                    "the handler's next wait (I/O, sleep): a synchronous handler that "
                    "computes without waiting runs until it returns, for ever if it never "
                    "does, and stops every other greenlet of the worker meanwhile")
        problems.append(FieldProblem(
            f"tiers.{tier}.accept_unenforced_time_limit", False,
            f"{why}; past time_limit_s ({time_limit_s:g}s) plus a margin, a delivery of its "
            "try in another process judges it lost and runs it again: give the handler's own calls "
            "timeouts that end it before time_limit_s (async handlers are cancelled at "
            "soft_time_limit_s) and set accept_unenforced_time_limit = true, or use "
            "pool = \"prefork\""))
    return problems
