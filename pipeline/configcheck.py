"""Cross-field checks of a configuration: what ``pipeline config check`` reports.

Each field of :class:`~pipeline.settings.Settings` is valid on its own once it has
loaded; :func:`check_settings` finds what is wrong between them (a rule naming an
unknown tier, two tiers on one queue, a visibility timeout shorter than a tier's
longest unacked time, a RabbitMQ broker without a Redis ``state_url``, a Redis
broker with a ``state_url`` naming another Redis) and, when asked to import the
handler modules, between the handlers and the config. URLs are shown without
their passwords.
"""

from __future__ import annotations

import importlib

from pipeline.errors import FieldProblem
from pipeline.redisurl import redact, same_redis
from pipeline.settings import Settings

__all__ = ["SUPPORTED_SCHEMES", "check_settings", "state_url_problem"]

SUPPORTED_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")


def check_settings(settings: Settings, *, import_handlers: bool = False) -> list[FieldProblem]:
    """Cross-field problems, one per entry (empty when the config is sound)."""
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
        for name, tier in tiers.items():
            if vt < tier.longest_unacked_s:
                problems.append(FieldProblem(
                    "broker_visibility_timeout_s", vt,
                    f"shorter than tier {name!r}'s longest unacked time "
                    f"{tier.longest_unacked_s:g}s (time_limit_s x (prefetch_multiplier + 1)): "
                    "running tasks would be redelivered twice",
                ))
    if import_handlers:
        for i, module in enumerate(settings.handler_modules):
            try:
                importlib.import_module(module)
            except Exception as exc:
                problems.append(
                    FieldProblem(f"handler_modules[{i}]", module, f"cannot import: {exc!r}")
                )
        problems += _handler_problems(settings)
    return problems


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
    from pipeline.events import Event
    from pipeline.handlers import registry
    from pipeline.tiers import classify

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
