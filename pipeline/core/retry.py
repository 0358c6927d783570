"""What happens after a handler fails: retry (and when) or dead-letter (and why).

Pure functions, no I/O. :func:`compute_backoff` is exponential backoff with full
jitter (AWS architecture blog, "Exponential Backoff And Jitter"), capped per tier;
:func:`decide` applies a tier's retry limit and exception lists.
"""

from __future__ import annotations

import builtins
import importlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from pipeline.core.tiers import TierConfig
from pipeline.errors import PermanentError, RetryAfter, UsageError

__all__ = ["Decision", "Reason", "compute_backoff", "compute_deferral", "decide",
           "exception_matches", "qualname"]

DEFERRAL_SPREAD_DOUBLINGS = 2  # a deferral's jitter window stops growing at spread_s * 2**2


class Reason(StrEnum):
    """Why a piece of work is in the dead-letter queue."""

    RETRIES_EXHAUSTED = "retries_exhausted"
    PERMANENT_ERROR = "permanent_error"
    INVALID_PAYLOAD = "invalid_payload"
    NO_HANDLER = "no_handler"
    MAX_DELIVERIES = "max_deliveries"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Decision:
    """``retry`` with ``delay_s``, or dead-letter with ``reason``."""

    retry: bool
    delay_s: float = 0.0
    reason: Reason | None = None


def compute_backoff(
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based).

    Full jitter: uniform in ``[0, min(max_s, base_s * 2 ** (attempt - 1))]``, so a
    crowd of failures spreads out instead of retrying in lock-step.
    """
    if attempt < 1:
        raise UsageError(f"attempt must be >= 1, got {attempt}")
    exponent = min(attempt - 1, 62)  # 2**62 s already dwarfs any cap
    window = min(max_s, base_s * (2**exponent))
    return float(window * rand())


def compute_deferral(
    wait_s: float,
    *,
    spread_s: float,
    deferrals: int,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to defer work that may not run now: at least ``wait_s`` (a breaker's
    remaining cool-down, a tenth of a spent retry budget's window) plus a jitter
    window of ``spread_s``, doubling with each earlier deferral of the same work up
    to ``4 x spread_s``.

    Deferring only to the end of the wait brings every deferred task back at once:
    when at most ``half_open_probes`` may call, or when the budget has room for a
    few; the rest defer again and again, so a long outage spends the workers
    re-running deferrals. The growing window spreads the backlog out, and its
    release after recovery too.
    """
    doublings = min(max(deferrals, 0), DEFERRAL_SPREAD_DOUBLINGS)
    return float(max(wait_s, 0.0) + spread_s * (2**doublings) * rand())


def decide(
    exc: BaseException,
    *,
    attempt: int,
    tier: TierConfig,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """Retry or dead-letter after ``attempt`` (1-based) failed with ``exc``."""
    if isinstance(exc, PermanentError) or exception_matches(exc, tier.dont_retry_on):
        return Decision(retry=False, reason=Reason.PERMANENT_ERROR)
    if not isinstance(exc, RetryAfter) and not exception_matches(exc, tier.retry_on):
        return Decision(retry=False, reason=Reason.PERMANENT_ERROR)
    if attempt > tier.max_retries:
        return Decision(retry=False, reason=Reason.RETRIES_EXHAUSTED)
    if isinstance(exc, RetryAfter):
        return Decision(retry=True, delay_s=exc.delay_s)
    delay = compute_backoff(attempt, base_s=tier.backoff_base_s, max_s=tier.backoff_max_s,
                            rand=rand)
    return Decision(retry=True, delay_s=delay)


def exception_matches(exc: BaseException, names: Sequence[str]) -> bool:
    """Whether ``exc`` is an instance of any class named in ``names``.

    Names are builtin names (``"ValueError"``) or dotted paths
    (``"requests.exceptions.Timeout"``); names that do not resolve match nothing
    except by class name, so a worker without the library still classifies.
    """
    for name in names:
        cls = _resolve(name)
        if cls is not None and isinstance(exc, cls):
            return True
        if cls is None and any(qualname(k) == name for k in type(exc).__mro__):
            return True
    return False


@lru_cache(maxsize=256)
def _resolve(name: str) -> type[BaseException] | None:
    module, _, attr = name.rpartition(".")
    try:
        owner = importlib.import_module(module) if module else builtins
        obj = getattr(owner, attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def qualname(cls: type) -> str:
    """An exception class as DLQ records store it and ``retry_on`` may name it:
    ``ValueError`` for a builtin, else ``module.Class``."""
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
