"""Batched tiers: many events per Celery message, per-event semantics kept.

Celery's per-message cost (~1 ms of worker CPU here) caps one worker near
1,000 tasks/s. A tier with ``batch_size = N`` packs up to N events that share
one handler into one ``pipeline.handle_batch`` message at publish time; the
worker runs the handler over the batch. Each event keeps its own task id, done
mark, attempts and DLQ record: an event that fails is retried or dead-lettered
*alone*, as an ordinary ``pipeline.handle`` task; one that already succeeded is
skipped. A batch that keeps killing its worker (a poisoned event crashing the
process) is split into single-event tasks, so the poison isolates itself and
meets ``max_deliveries`` alone.

Packing is all-or-nothing per batch message: a Lua script claims the
idempotency keys of its events and pushes the message only if none was a
duplicate; otherwise it releases its claims and the publisher re-packs without
the duplicates.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery.exceptions import Reject, TimeLimitExceeded

from pipeline.errors import RetryAfter
from pipeline.events import Event
from pipeline.handlers import HandlerContext, registry, running
from pipeline.messages import TaskSpec
from pipeline.state import Keys

if TYPE_CHECKING:
    from celery import Celery

    from pipeline.runtime import Runtime

__all__ = ["BATCH_TASK_NAME", "PACK_LUA", "batch_outcomes", "batch_spec", "register_batch_task"]

BATCH_TASK_NAME = "pipeline.handle_batch"
BATCH_RESULT_PREFIX = "batch:"  # then "succeeded=98;retry_scheduled=2" (per-event results)
log = logging.getLogger(__name__)

# ARGV: ttl_s, n, dedupe keys * n, list key, message. Returns {} when pushed, else the
# 1-based indexes of the duplicates (claims of this call released, nothing pushed).
PACK_LUA = """
local ttl, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local claimed, dups = {}, {}
for i = 1, n do
  if ttl == 0 or redis.call('SET', ARGV[2 + i], '1', 'NX', 'EX', ttl) then
    claimed[#claimed + 1] = ARGV[2 + i]
  else
    dups[#dups + 1] = i
  end
end
if #dups > 0 then
  if #claimed > 0 then redis.call('DEL', unpack(claimed)) end
  return dups
end
redis.call('LPUSH', ARGV[3 + n], ARGV[4 + n])
return {}
"""


def batch_spec(runtime: Runtime, events: Sequence[dict[str, Any]], *, handler: str, tier: str,
               accepted_at: float) -> TaskSpec:
    """The ``pipeline.handle_batch`` message for ``events`` (all for ``handler``)."""
    cfg = runtime.settings.tier(tier)
    hard_s = cfg.time_limit_s * max(1, len(events) // 10)  # a batch runs many handlers
    return TaskSpec(
        queue=cfg.queue_name(tier), task_id=str(uuid.uuid4()), args=[list(events)],
        kwargs={"handler": handler, "tier": tier, "attempt": 1, "accepted_at": accepted_at},
        time_limit_s=hard_s, soft_time_limit_s=hard_s * 0.9, task=BATCH_TASK_NAME)


def run_batch(rt: Runtime, batch_id: str, events: list[dict[str, Any]],
              kwargs: dict[str, Any]) -> str:
    from pipeline.ingest import task_id_for
    from pipeline.tasks import Attempt

    handler = str(kwargs.get("handler", ""))
    tier_name = str(kwargs.get("tier", rt.settings.default_tier))
    tier = rt.settings.tier(tier_name)
    begin = rt.ledger.begin(batch_id, 1, tier_name, tier)
    attempts = [Attempt(rt, task_id_for(str(e.get("id")), handler), e, dict(kwargs))
                for e in events]
    if begin.deliveries > tier.max_deliveries:
        log.warning("batch %s of %d events keeps killing workers: splitting it", batch_id,
                    len(events))
        rt.publisher.send([rt.publisher.spec(a.event, handler=handler, tier=tier_name,
                                             task_id=a.task_id, attempt=1,
                                             accepted_at=a.accepted_at) for a in attempts])
        rt.ledger.clear(batch_id, 1)
        return f"split:{len(events)}"
    entry = registry.get(handler)
    pipe = rt.state.pipeline(transaction=False)
    for a in attempts:
        pipe.exists(Keys.done(a.task_id))
    already = pipe.execute()
    succeeded: list[str] = []
    outcomes: Counter[str] = Counter()  # per-event results, as pipeline.handle returns them
    for a, done in zip(attempts, already, strict=True):
        if done:
            outcomes["already_done"] += 1
            continue
        if entry is None:
            outcomes[a.run()] += 1  # dead-letters as no_handler with its own record
            continue
        try:
            event = Event.model_validate(a.event)
            ctx = HandlerContext(task_id=a.task_id, handler=handler, tier=tier_name,
                                 attempt=1, max_attempts=tier.max_retries + 1, state=rt.state)
            with running(ctx):
                entry(event)
        except (Reject, TimeLimitExceeded):
            raise
        except RetryAfter as exc:
            outcomes[a.defer(exc.delay_s, "requested")] += 1
            continue
        except Exception as exc:
            outcomes[a.failed(exc)] += 1  # retried alone (attempt 2) or dead-lettered alone
            continue
        succeeded.append(a.task_id)
        outcomes["succeeded"] += 1
    for task_id in succeeded:
        rt.ledger.mark_done(task_id, pipe)
    pipe.execute()
    rt.ledger.clear(batch_id, 1)
    return BATCH_RESULT_PREFIX + ";".join(f"{k}={v}" for k, v in outcomes.items())


def batch_outcomes(retval: str) -> list[tuple[str, int]]:
    """``[(per-event result, count)]`` from what ``pipeline.handle_batch`` returned."""
    body = retval.removeprefix(BATCH_RESULT_PREFIX)
    pairs = (part.rpartition("=") for part in body.split(";") if part)
    return [(result, int(n)) for result, _, n in pairs if n.isdigit()]


def register_batch_task(app: Celery) -> Any:
    from pipeline.runtime import runtime_for
    from pipeline.tasks import PipelineTask, settle_or_requeue

    @app.task(name=BATCH_TASK_NAME, bind=True, base=PipelineTask, shared=False)
    def handle_batch(self: PipelineTask, /, events: list[dict[str, Any]], **kwargs: Any) -> str:
        batch_id = str(self.request.id)
        return settle_or_requeue(
            batch_id, lambda: run_batch(runtime_for(self.app), batch_id, events, kwargs))

    return handle_batch
