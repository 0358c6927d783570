"""Cross-field checks of a configuration: what ``pipeline config check`` reports.

Each field of :class:`~pipeline.config.model.Settings` is valid on its own once it has
loaded; :func:`check_settings` finds what is wrong between them (a rule naming an
unknown tier, two tiers on one queue, a visibility timeout shorter than a tier's
longest unacked time, a RabbitMQ broker without a Redis ``state_url``, a Redis
broker with a ``state_url`` naming another Redis, a ``gevent`` tier without gevent
installed, a ``threads`` or ``gevent`` tier that has not accepted that its hard time
limit is not enforced) and, when asked to import the
handler modules, between the handlers and the config. URLs are shown without
their passwords.

:func:`config_warnings` finds what is valid but probably not meant (``pipeline config
check`` prints them as warnings and still exits 0): a tier that nothing routes to,
and a file whose ``[tiers]`` silently drops the built-in tiers and rules.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from pipeline.config.model import Settings
from pipeline.core.events import Event
from pipeline.core.handlers import registry
from pipeline.core.pools import gevent_installed, pool_problems
from pipeline.core.redisurl import redact, same_redis
from pipeline.core.tiers import classify
from pipeline.errors import NO_VALUE, FieldProblem

__all__ = ["SUPPORTED_SCHEMES", "check_settings", "config_warnings", "state_url_problem"]

TIER_NAME_CUTOFF = 0.75  # difflib similarity above which a tier name looks like a typo

SUPPORTED_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")


def check_settings(settings: Settings, *, import_handlers: bool = False) -> list[FieldProblem]:
    """Cross-field problems, one per entry (empty when the config is sound)."""
    problems = _tier_problems(settings) + _pool_problems(settings)
    problems += _broker_problems(settings)
    if import_handlers:
        problems += _import_problems(settings)
        problems += _handler_problems(settings)
    return problems


def _tier_problems(settings: Settings) -> list[FieldProblem]:
    """The tiers against the rest: none declared, an unknown default or rule tier, two
    tiers on one queue or a tier on the dead-letter queue."""
    problems: list[FieldProblem] = []
    tiers = settings.tiers
    if not tiers:
        problems.append(FieldProblem("tiers", {}, "at least one tier must be declared"))
    if tiers and settings.default_tier not in tiers:
        problems.append(
            FieldProblem("default_tier", settings.default_tier,
                         f"not a tier (tiers: {sorted(tiers)})")
        )
    for i, rule in enumerate(settings.rules):
        if rule.tier not in tiers:
            problems.append(
                FieldProblem(f"rules[{i}].tier", rule.tier,
                             f"unknown tier (tiers: {sorted(tiers)})")
            )
    seen: dict[str, str] = {}
    for name, tier in tiers.items():
        queue = tier.queue_name(name)
        if queue in seen:
            problems.append(
                FieldProblem(f"tiers.{name}.queue", queue, f"same queue as tier {seen[queue]!r}")
            )
        seen[queue] = name
        if queue == settings.dead_letter_queue:
            problems.append(
                FieldProblem(f"tiers.{name}.queue", queue, "same name as dead_letter_queue")
            )
    return problems


def _pool_problems(settings: Settings) -> list[FieldProblem]:
    """Each tier's pool: gevent installed, an unenforced hard time limit accepted."""
    problems: list[FieldProblem] = []
    gevent_available = gevent_installed()
    for name, tier in settings.tiers.items():
        problems += pool_problems(name, tier.pool, acknowledged=tier.accept_unenforced_time_limit,
                                  time_limit_s=tier.time_limit_s,
                                  gevent_available=gevent_available)
    return problems


def _broker_problems(settings: Settings) -> list[FieldProblem]:
    """The broker and the state store: a supported scheme, a Redis state store (the
    broker's own with a Redis broker), no key prefix, a long enough visibility timeout."""
    problems: list[FieldProblem] = []
    scheme = settings.broker_scheme
    if scheme not in SUPPORTED_SCHEMES:
        problems.append(
            FieldProblem("broker_url", redact(settings.effective_broker_url),
                         f"unsupported scheme {scheme!r} "
                         f"(use one of {', '.join(SUPPORTED_SCHEMES)})")
        )
    elif not settings.effective_state_url:
        problems.append(
            FieldProblem("state_url", None,
                         "a Redis URL is required with a RabbitMQ broker (retry schedule, "
                         "delivery counts)")
        )
    if settings.broker_is_redis and settings.state_url:
        problem = state_url_problem(settings.effective_broker_url, settings.state_url)
        if problem is not None:
            problems.append(problem)
    if settings.broker_is_redis and settings.broker_transport_options.get("global_keyprefix"):
        problems.append(FieldProblem(
            "broker_transport_options.global_keyprefix",
            settings.broker_transport_options["global_keyprefix"],
            "not supported: the pipeline's Lua steps (fetch, settle, ingest, retries) name "
            "kombu's keys without the prefix; use a database of the pipeline's own instead"))
    if settings.broker_is_redis:
        vt = settings.visibility_timeout_s
        for name, tier in settings.tiers.items():
            if vt < tier.longest_unacked_s:
                problems.append(FieldProblem(
                    "broker_visibility_timeout_s", vt,
                    f"shorter than tier {name!r}'s longest unacked time "
                    f"{tier.longest_unacked_s:g}s (time_limit_s x (prefetch_multiplier + 1)): "
                    "running tasks would be redelivered twice",
                ))
    return problems


def _import_problems(settings: Settings) -> list[FieldProblem]:
    """Each handler module imported: those that cannot be."""
    problems: list[FieldProblem] = []
    for i, module in enumerate(settings.handler_modules):
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(
                FieldProblem(f"handler_modules[{i}]", module, f"cannot import: {exc!r}")
            )
    return problems


def config_warnings(settings: Settings, file_data: dict[str, Any] | None,
                    builtin: dict[str, Any]) -> list[FieldProblem]:
    """What loads and runs but is probably a mistake: a tier that neither
    ``default_tier`` nor any rule routes to (only events that name it reach it), and
    a file (``file_data``, the TOML as read) whose ``[tiers]`` replaces the built-in
    tiers and rules (``builtin``, default.toml as read) without redeclaring them."""
    warnings: list[FieldProblem] = []
    routed = {settings.default_tier, *(rule.tier for rule in settings.rules)}
    for name in settings.tiers:
        if name in routed:
            continue
        close = difflib.get_close_matches(name, sorted(routed | set(builtin.get("tiers", {}))),
                                          n=1, cutoff=TIER_NAME_CUTOFF)
        hint = f"; a typo of `{close[0]}`?" if close and close[0] != name else ""
        warnings.append(FieldProblem(
            f"tiers.{name}", NO_VALUE,
            f"nothing routes to this tier: it is not default_tier and no rule names it, so "
            f"only events that say \"tier\": \"{name}\" reach it{hint}"))
    if file_data is not None and "tiers" in file_data:
        dropped = [t for t in builtin.get("tiers", {}) if t not in file_data["tiers"]]
        lost_rules = len(builtin.get("rules", [])) if "rules" not in file_data else 0
        if dropped or lost_rules:
            parts = ([f"drops the built-in tier(s) {', '.join(dropped)}"] if dropped else [])
            if lost_rules:
                parts.append(f"drops the {lost_rules} built-in rules (declare [[rules]] "
                             "to route by type or source)")
            warnings.append(FieldProblem(
                "tiers", NO_VALUE,
                "this file declares [tiers], which replaces the built-in tiers and rules "
                f"rather than merging: it {' and '.join(parts)}"))
    return warnings


def state_url_problem(broker_url: str, state_url: str) -> FieldProblem | None:
    """A ``state_url`` that is not the Redis broker's own server and database.

    Ingest's claim-and-enqueue and the retry mover are each one Lua script that
    writes state keys and ``LPUSH``es onto tier queues in the *state* Redis; workers
    consume the broker, so work pushed anywhere else is accepted and never runs.
    """
    if same_redis(broker_url, state_url):
        return None
    return FieldProblem(
        "state_url", redact(state_url),
        f"not the Redis broker ({redact(broker_url)}): one atomic step moves work between "
        "the pipeline's state and the tier queues, so with a Redis broker both must be one "
        "Redis (same server and database); unset state_url to use the broker")


def _handler_problems(settings: Settings) -> list[FieldProblem]:
    """Handlers against the config: undefined breakers, unbatchable handlers on batch tiers."""
    problems = []
    modules = tuple(settings.handler_modules)
    for name in registry.names():
        entry = registry.get(name)
        assert entry is not None
        module = getattr(entry.func, "__module__", "")
        if not any(module == m or module.startswith(m + ".") for m in modules):
            continue  # registered by something else in this process, not by this config
        for downstream in entry.downstreams:
            if downstream not in settings.breakers:
                problems.append(FieldProblem(
                    f"breakers.{downstream}", None,
                    f"handler {name!r} declares downstream {downstream!r} but no "
                    f"[breakers.{downstream}] is configured"))
        if entry.batchable or any(c in entry.pattern for c in "*?["):
            continue
        probe = Event(type=entry.pattern, source="config-check")
        tier = classify(probe, settings.rules, settings.tiers, settings.default_tier)
        if tier in settings.tiers and settings.tiers[tier].batch_size > 0:
            problems.append(FieldProblem(
                f"tiers.{tier}.batch_size", settings.tiers[tier].batch_size,
                f"handler {name!r} (batchable=False) handles {entry.pattern!r}, which the "
                f"rules send to this batched tier"))
    return problems
