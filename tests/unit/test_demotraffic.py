"""The demo's traffic: every tier gets events, and the events sent to fail are few
and capped however long the demo runs."""

from __future__ import annotations

import random
from collections import Counter
from typing import cast

from pipeline.config.load import load_settings
from pipeline.core.events import Event
from pipeline.core.tiers import classify
from pipeline.local.demotraffic import DOOMED, DOOMED_EVERY, DOOMED_MAX, MIX, demo_events

AN_HOUR_OF_EVENTS = 20 * 3600  # what the demo sends in an hour at its rate


def sent_in_ticks(total: int, per_tick: int, seed: int = 7) -> list[dict[str, object]]:
    rng = random.Random(seed)
    events: list[dict[str, object]] = []
    while len(events) < total:
        events += demo_events(per_tick, sent_before=len(events), rng=rng)
    return events


def test_the_demo_mix_reaches_all_four_tiers_by_the_default_rules() -> None:
    settings = load_settings()
    events = sent_in_ticks(2000, 10)
    tiers = Counter(classify(Event.model_validate(e), settings.rules, settings.tiers,
                             settings.default_tier) for e in events if e["type"] not in DOOMED)
    assert set(tiers) == {"critical", "high", "standard", "bulk"}
    assert {t for t, _ in MIX} == {e["type"] for e in events} - set(DOOMED)


def test_doomed_events_are_capped_however_long_the_demo_runs() -> None:
    events = sent_in_ticks(AN_HOUR_OF_EVENTS, 10)
    doomed = Counter(str(e["type"]) for e in events if e["type"] in DOOMED)
    assert sum(doomed.values()) == DOOMED_MAX
    assert set(doomed) == set(DOOMED)  # a permanent error and exhausted retries, both


def test_the_first_doomed_event_comes_within_the_first_batches() -> None:
    events = sent_in_ticks(DOOMED_EVERY, 10)
    assert [e["type"] for e in events].count(DOOMED[0]) == 1


def test_demo_events_carry_unique_ids_and_the_readme_reward_payload() -> None:
    events = sent_in_ticks(3000, 10)
    assert len({e["id"] for e in events}) == len(events)
    reward = next(e for e in events if e["type"] == "reward.granted")
    assert set(cast(dict[str, object], reward["payload"])) == {"user_id", "amount"}
