"""Where one delivery of one try stands: the try's identity and what follows from it.

A :class:`TryState` is read from a task message (its event and kwargs) and names
exactly one try, ``(task id, key)``, the key being ``[<lineage>/]<attempt>.<deferrals>``
(:func:`pipeline.worker.ledger.try_key`); its token names this delivery of it. It
does no I/O: the ways a try settles (:mod:`pipeline.worker.settle`) and the steps
of a delivery (:mod:`pipeline.worker.attempt`) build on it.
"""

from __future__ import annotations

import uuid
from typing import Any, Self

from pipeline.core.redact import mask_text, secrets_in
from pipeline.messages.task import TaskSpec
from pipeline.worker.batchledger import BatchLedger
from pipeline.worker.ledger import Begin, Try, try_key
from pipeline.worker.runtime import Runtime
from pipeline.worker.taskstate import Verdict

__all__ = ["MAX_PRIORITY", "RECHECK_MARGIN_S", "TryState"]

MAX_PRIORITY = 9  # the lowest of the ten priority sub-queues the app configures on Redis
RECHECK_MARGIN_S = 5.0  # beyond a try's hard time limit before its silence means it was lost


class TryState:
    """One delivery of one try: the event, the handler and where it stands."""

    def __init__(self, runtime: Runtime, task_id: str, event: dict[str, Any],
                 kwargs: dict[str, Any], token: str = "", as_try: Try | None = None) -> None:
        self.rt = runtime
        self.task_id = task_id
        self.event = event
        self.handler = str(kwargs.get("handler", ""))
        tier = str(kwargs.get("tier", ""))
        self.tier = tier if tier in runtime.settings.tiers else runtime.settings.default_tier
        self.attempt = int(kwargs.get("attempt", 1))
        self.first_failed_at: str | None = kwargs.get("first_failed_at")
        self.accepted_at: float | None = kwargs.get("accepted_at")
        self.deferrals = int(kwargs.get("deferrals", 0))
        self.lineage = str(kwargs.get("lineage", ""))  # each publish (and replay) starts one
        self.lost = int(kwargs.get("lost", 0))  # earlier tries lost with their process
        # the retry budget admitted this attempt already (deferred after it was)
        self.budget_charged = kwargs.get("budget_charged") is True
        self.key = try_key(self.attempt, self.deferrals, self.lineage)
        # names this delivery in the running mark (a batch derives its tries' from one)
        self.token = token or uuid.uuid4().hex
        self.only_if_running = False  # settle only a try that began (hard time limit)
        self.settled_now = False  # the last settle wrote this try's outcome
        self.batch: BatchLedger | None = None  # a batch's: starts and done settles streamed
        self.started = False  # a batch's try: its start was written
        self.following: TryState | None = None  # a batch's next try, started by this settle
        self.begun: Begin | None = None  # this try's begin, done for the whole batch
        self.verdict: Verdict | None = None  # how it settled if not as a success (task state)
        # the handler's downstream calls, each with its outcome (None: not counted, the
        # probe lease only given back), recorded by the settle script that settles it
        self.records: list[tuple[str, bool | None]] = []
        # as_try(), built once (a batch's, given): what it reads never changes
        self._try: Try | None = as_try

    def sibling(self, task_id: str, event: dict[str, Any], token: str, as_try: Try) -> Self:
        """Another event's try in this one's batch message (the same kwargs), read
        from this one instead of from the kwargs again: a batch builds one per event.
        ``self`` must not have run; its lists are the only state not shared."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.task_id, other.event, other.token, other._try = task_id, event, token, as_try
        other.records = []
        return other

    def masked(self, text: str) -> str:
        """``text`` (failure text) with this event's ``redact_paths`` values masked: what
        logs and Celery's task state show; the DLQ record keeps it whole."""
        return mask_text(text, secrets_in(self.event, self.rt.settings.redact_paths))

    @property
    def queue(self) -> str:
        return self.rt.settings.queue_for(self.tier)

    def breaker_token(self, downstream: str) -> str:
        """This try's probe lease on ``downstream``: the main process can settle it
        after a hard time limit killed the child that held it."""
        return f"{self.task_id}:{self.key}:{downstream}"

    def as_try(self) -> Try:
        """What the ledger needs to begin this try."""
        if self._try is None:
            self._try = Try((self.task_id, self.key, self.token), self.attempt, self.tier,
                            self.rt.settings.tier(self.tier), self.budget_charged)
        return self._try

    def next_spec(self, *, attempt: int, deferrals: int, priority: int | None,
                  first_failed_at: str | None) -> TaskSpec:
        """The message of this task's next try (a retry or a deferral)."""
        spec = self.rt.messages.spec(
            self.event, handler=self.handler, tier=self.tier, task_id=self.task_id,
            attempt=attempt, first_failed_at=first_failed_at, priority=priority,
            accepted_at=self.accepted_at)
        spec.kwargs["lineage"] = self.lineage  # retries and deferrals continue this lineage
        extra = {"deferrals": deferrals, "lost": self.lost}
        spec.kwargs.update({k: v for k, v in extra.items() if v})
        return spec

    def requeue_priority(self, *, deferral: bool = False) -> int | None:
        """The message priority of this event's retry (one step behind fresh events
        of its priority) or deferral (two: behind retries too) when the tier's
        ``retries_yield`` (Redis, where kombu serves priority 0 first; on RabbitMQ the
        event's own)."""
        own = self.event.get("priority")
        if not (self.rt.settings.broker_is_redis
                and self.rt.settings.tier(self.tier).retries_yield):
            return own if isinstance(own, int) else None
        return min(int(own or 0) + (2 if deferral else 1), MAX_PRIORITY)

    def longest_run_s(self) -> float:
        """How long a delivery of this try can run before its hard time limit kills it
        (a batch's limit grows with its size), plus a margin."""
        tier = self.rt.settings.tier(self.tier)
        return tier.time_limit_s * max(1, tier.batch_size // 10) + RECHECK_MARGIN_S
