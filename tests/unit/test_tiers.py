"""Tier configuration and classification (pure logic)."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from pipeline.core.events import Event
from pipeline.core.tiers import Rule, TierConfig, classify

TIERS: dict[str, object] = {"critical": {}, "high": {}, "standard": {}, "bulk": {}}
RULES = [
    Rule(type="reward.*", tier="critical"),
    Rule(type="game.*", tier="high"),
    Rule(type="game.*", source="batch-*", tier="bulk"),  # shadowed by the rule above
    Rule(source="batch-*", tier="bulk"),
    Rule(type="audit.*", source="payments", tier="critical"),
]


def tier_of(**fields: Any) -> str:
    event = Event(**{"type": "misc.thing", "source": "web", **fields})
    return classify(event, RULES, TIERS, "standard")


def test_explicit_known_tier_wins_over_rules() -> None:
    assert tier_of(type="reward.granted", tier="bulk") == "bulk"


def test_explicit_unknown_tier_falls_back_to_the_rules() -> None:
    assert tier_of(type="reward.granted", tier="nosuchtier") == "critical"


def test_first_matching_rule_wins() -> None:
    assert tier_of(type="game.update", source="batch-7") == "high"


def test_type_glob_alone_matches() -> None:
    assert tier_of(type="reward.granted") == "critical"


def test_source_glob_alone_matches() -> None:
    assert tier_of(type="misc.thing", source="batch-nightly") == "bulk"


def test_rule_with_type_and_source_needs_both_to_match() -> None:
    assert tier_of(type="audit.entry", source="payments") == "critical"
    assert tier_of(type="audit.entry", source="web") == "standard"


def test_default_tier_when_no_rule_matches() -> None:
    assert tier_of(type="misc.thing", source="web") == "standard"


def test_glob_matching_is_case_sensitive() -> None:
    assert tier_of(source="BATCH-1") == "standard"


def test_soft_time_limit_must_be_below_time_limit() -> None:
    with pytest.raises(pydantic.ValidationError, match="soft_time_limit_s"):
        TierConfig(soft_time_limit_s=30, time_limit_s=30)


def test_backoff_base_must_not_exceed_backoff_max() -> None:
    with pytest.raises(pydantic.ValidationError, match="backoff_base_s"):
        TierConfig(backoff_base_s=10, backoff_max_s=5)


def test_backoff_base_equal_to_max_is_allowed() -> None:
    assert TierConfig(backoff_base_s=5, backoff_max_s=5).backoff_max_s == 5


def test_rule_needs_a_type_or_a_source_glob() -> None:
    with pytest.raises(pydantic.ValidationError, match="needs a 'type' or a 'source'"):
        Rule(tier="bulk")


def test_longest_unacked_is_time_limit_times_prefetch_plus_one() -> None:
    tier = TierConfig(time_limit_s=15, soft_time_limit_s=10, prefetch_multiplier=3)
    assert tier.longest_unacked_s == 60


def test_queue_name_defaults_to_the_tier_name() -> None:
    assert TierConfig().queue_name("bulk") == "bulk"
    assert TierConfig(queue="q.bulk").queue_name("bulk") == "q.bulk"
