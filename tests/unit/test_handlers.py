"""The handler registry and the @handler decorator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from pipeline.core.events import Event, parse_event
from pipeline.core.handlers import Handler, Registry, current, handler, registry


class Granted(pydantic.BaseModel):
    user_id: int
    amount: int


@pytest.fixture
def registered() -> Iterator[list[str]]:
    """Names to unregister from the shared registry after the test."""
    names: list[str] = []
    yield names
    for name in names:
        registry.unregister(name)


def event(event_type: str = "reward.granted", **payload: Any) -> Event:
    return parse_event({"type": event_type, "source": "test", "payload": payload})


def noop(event: Event) -> None:
    return None


def credit_wallet(event: Event) -> None:
    return None


def test_decorator_registers_under_module_and_qualname(registered: list[str]) -> None:
    name = f"{__name__}.credit_wallet"
    registered.append(name)
    handler("reward.granted")(credit_wallet)
    assert registry.get(name) == Handler(name, "reward.granted", credit_wallet)


def test_decorator_default_name_works_for_a_nested_function(registered: list[str]) -> None:
    def credit(event: Event) -> None:
        return None

    try:
        handler("reward.granted")(credit)
    finally:
        mine = [h.name for h in registry.for_type("reward.granted") if h.func is credit]
        registered.extend(mine)
    assert len(mine) == 1


def test_decorator_registers_under_an_explicit_name(registered: list[str]) -> None:
    registered.append("wallet.credit")
    handler("reward.granted", name="wallet.credit")(noop)
    assert registry.get("wallet.credit") == Handler("wallet.credit", "reward.granted", noop)


def test_decorator_returns_the_function_unchanged(registered: list[str]) -> None:
    registered.append("wallet.unchanged")
    assert handler("reward.granted", name="wallet.unchanged")(noop) is noop


def test_duplicate_name_for_a_different_function_raises() -> None:
    reg = Registry()
    reg.register(Handler("dup", "a.b", noop))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Handler("dup", "a.b", event))


def test_registering_the_same_function_twice_is_idempotent() -> None:
    reg = Registry()
    reg.register(Handler("same", "a.b", noop))
    reg.register(Handler("same", "a.b", noop))
    assert reg.names() == ["same"]


def test_duplicate_name_for_a_different_lambda_raises() -> None:
    reg = Registry()
    reg.register(Handler("dup", "a.b", lambda e: "first"))
    with pytest.raises(ValueError, match="already registered"):
        reg.register(Handler("dup", "a.b", lambda e: "second"))


def test_name_that_is_not_a_dotted_identifier_is_rejected() -> None:
    with pytest.raises(ValueError, match="dotted identifier"):
        Registry().register(Handler("has space", "a.b", noop))


def test_glob_pattern_matches_types_under_it() -> None:
    reg = Registry()
    reg.register(Handler("game", "game.*", noop))
    assert [h.name for h in reg.for_type("game.update")] == ["game"]
    assert reg.for_type("gamer.update") == []


def test_for_type_returns_every_matching_handler_for_fan_out() -> None:
    reg = Registry()
    for name, pattern in [("a", "reward.granted"), ("b", "reward.*"), ("c", "game.*")]:
        reg.register(Handler(name, pattern, noop))
    assert sorted(h.name for h in reg.for_type("reward.granted")) == ["a", "b"]


def test_unregister_removes_the_handler() -> None:
    reg = Registry()
    reg.register(Handler("gone", "a.b", noop))
    reg.unregister("gone")
    assert (reg.get("gone"), len(reg)) == (None, 0)


def test_handler_with_a_model_is_called_with_the_validated_model(
    registered: list[str],
) -> None:
    seen: list[tuple[Event, Granted]] = []

    @handler("reward.granted", model=Granted, name="wallet.model")
    def credit(ev: Event, payload: Granted) -> None:
        seen.append((ev, payload))

    registered.append("wallet.model")
    entry = registry.get("wallet.model")
    assert entry is not None
    ev = event(user_id="7", amount=100)
    entry(ev)
    assert seen == [(ev, Granted(user_id=7, amount=100))]


def test_handler_with_a_model_rejects_a_payload_that_fails_it() -> None:
    entry = Handler("h", "reward.granted", lambda ev, p: None, model=Granted)
    with pytest.raises(pydantic.ValidationError):
        entry(event(user_id="seven"))


def test_handler_without_a_model_gets_only_the_event() -> None:
    entry = Handler("h", "reward.granted", lambda ev: ev.payload)
    assert entry(event(x=1)) == {"x": 1}


def test_current_raises_outside_a_handler() -> None:
    with pytest.raises(RuntimeError, match="outside a running handler"):
        current()


def test_a_handler_handles_the_types_its_pattern_matches() -> None:
    glob = Handler("h.glob", "game.*", lambda e: None)
    exact = Handler("h.exact", "reward.granted", lambda e: None)
    assert glob.handles("game.updated")
    assert not glob.handles("reward.granted")
    assert exact.handles("reward.granted")
    assert not exact.handles("reward.granted.extra")
