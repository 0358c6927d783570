"""What ``pipeline up --demo`` sends: the seed's event classes on all four tiers,
and a bounded trickle of events that can never succeed.

The mix (:data:`MIX`) is the README's: reward grants (critical), game updates
(high; their downstream fails :data:`GAME_FAIL_RATE` of its calls, so retries
show), interactions (standard) and analytics (bulk). One event in
:data:`DOOMED_EVERY` is doomed — alternately ``demo.invalid`` (a permanent error:
dead-lettered at once) and ``demo.fail`` (fails until ``pipeline demo fix``:
dead-lettered when its retries run out) — until :data:`DOOMED_MAX` have been sent,
so the DLQ has something to show and stops growing. :func:`demo_events` decides
(pure); :class:`DemoSender` publishes.
"""

from __future__ import annotations

import random
import uuid
from typing import Any

import pipeline.app as default_app
from pipeline.worker.runtime import runtime_for

__all__ = ["DEMO_DB", "DEMO_RATE_PER_S", "DOOMED", "DOOMED_EVERY", "DOOMED_MAX", "MIX",
           "DemoSender", "demo_events"]

DEMO_DB = 1  # the embedded broker's database a --demo stack runs in (others use db 0)
DEMO_RATE_PER_S = 20  # events per second the demo publishes
DOOMED_EVERY = 40  # one doomed event per this many sent (one every 2 s at the demo rate)
DOOMED_MAX = 12  # doomed events per `pipeline up --demo` run: the DLQ's bounded trickle
GAME_FAIL_RATE = 0.1  # share of the demo downstream's calls that fail (retried, not lost)
DEMO_SOURCE = "demo"  # the source of every event the demo sends
USER_IDS = 10_000  # demo user ids are 1..USER_IDS

MIX: tuple[tuple[str, int], ...] = (  # (event type, weight): the seed's classes
    ("reward.granted", 5),  # critical
    ("game.updated", 20),  # high
    ("interaction.clicked", 50),  # standard
    ("analytics.tracked", 25),  # bulk
)
DOOMED = ("demo.invalid", "demo.fail")  # sent in turn, DOOMED_MAX in all


def demo_events(count: int, *, sent_before: int, rng: random.Random) -> list[dict[str, Any]]:
    """The next ``count`` demo events, ``sent_before`` having been sent this run."""
    events = []
    for n in range(sent_before, sent_before + count):
        doomed_index, rest = divmod(n, DOOMED_EVERY)
        if rest == DOOMED_EVERY - 1 and doomed_index < DOOMED_MAX:
            kind = DOOMED[doomed_index % len(DOOMED)]
        else:
            kind = rng.choices([t for t, _ in MIX], [w for _, w in MIX])[0]
        events.append({"id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                       "type": kind, "source": DEMO_SOURCE, "payload": _payload(kind, rng)})
    return events


def _payload(kind: str, rng: random.Random) -> dict[str, Any]:
    user_id = rng.randint(1, USER_IDS)
    if kind == "reward.granted":
        return {"user_id": user_id, "amount": rng.choice((10, 50, 100))}
    if kind == "game.updated":
        return {"user_id": user_id, "fail_rate": GAME_FAIL_RATE}
    if kind == "interaction.clicked":
        return {"user_id": user_id, "button": rng.choice(("play", "shop", "share"))}
    if kind == "analytics.tracked":
        return {"user_id": user_id, "metric": "session_s", "value": rng.randint(1, 3600)}
    return {}


class DemoSender:
    """Publishes :data:`DEMO_RATE_PER_S` demo events a second, a tick at a time."""

    def __init__(self) -> None:
        self.publisher = runtime_for(default_app.app).publisher  # built from the stack's env
        self.rng = random.Random()
        self.sent = 0

    def tick(self, period_s: float) -> None:
        """Send what ``period_s`` seconds of demo traffic holds, in one batch."""
        events = demo_events(int(DEMO_RATE_PER_S * period_s), sent_before=self.sent,
                             rng=self.rng)
        self.publisher.publish_many(events)
        self.sent += len(events)
