"""Settings: a TOML file layered over the built-in default, then the environment.

Precedence, highest first: keyword arguments, ``PIPELINE_*`` variables (nested with
``__``, e.g. ``PIPELINE_TIERS__BULK__CONCURRENCY=8``; lists as JSON), the file named
by ``PIPELINE_CONFIG``, the built-in ``default.toml``. A file that declares ``tiers``
replaces the built-in tiers and rules rather than merging with them.

:func:`load_settings` raises :class:`~pipeline.errors.ConfigError` naming every
offending setting, its value and where it came from; :func:`check_settings` adds
the cross-field checks that ``pipeline config check`` reports.
"""

from __future__ import annotations

import importlib
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import Field, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from pipeline.breaker import BreakerConfig
from pipeline.errors import ConfigError, FieldProblem
from pipeline.events import DEFAULT_MAX_PAYLOAD_BYTES
from pipeline.tiers import Rule, TierConfig

__all__ = ["CONFIG_ENV", "Settings", "check_settings", "load_settings"]

CONFIG_ENV = "PIPELINE_CONFIG"  # names the TOML file to layer over the default
ENV_PREFIX = "PIPELINE_"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"  # used when no broker_url is set anywhere
VISIBILITY_FLOOR_S = 60.0  # derived visibility timeouts are never shorter than this
VISIBILITY_MARGIN_S = 30.0  # added to the longest unacked time when deriving the timeout
SUPPORTED_SCHEMES = ("redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp")


class Settings(BaseSettings):
    """The pipeline's configuration. See README's configuration reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    #: Celery broker URL: `redis://`, `rediss://`, `sentinel://h:p;sentinel://h2:p` or
    #: `amqp://`. Unset: `redis://127.0.0.1:6379/0`, and `pipeline up` starts an embedded
    #: broker. TLS options go in the `rediss://` query; always give `ssl_cert_reqs`.
    broker_url: str | None = None
    #: Redis holding the retry schedule, delivery counts, breakers and retry budgets.
    #: Unset: the broker, when it is Redis. Required with a RabbitMQ broker.
    state_url: str | None = None
    #: kombu transport options merged over the derived ones (`master_name` for Sentinel,
    #: `unacked_restore_interval`, ...).
    broker_transport_options: dict[str, Any] = Field(default_factory=dict)
    #: Redis visibility timeout. Unset: derived, the longest over the tiers of
    #: `time_limit_s * (prefetch_multiplier + 1)`, plus 30 s, at least 60 s.
    broker_visibility_timeout_s: Annotated[float, Field(gt=0)] | None = None
    #: modules imported by producers and workers to register handlers;
    #: `["pipeline.demo"]` enables the demo handlers.
    handler_modules: list[str] = Field(default_factory=list)
    #: tier for events that no rule matches.
    default_tier: str = "standard"
    #: broker queue that holds dead-letter records.
    dead_letter_queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$")] = "dead_letter"
    #: largest accepted payload, JSON-encoded.
    max_payload_bytes: Annotated[int, Field(gt=0)] = DEFAULT_MAX_PAYLOAD_BYTES
    #: how often each tier worker moves due retries back onto its tier queue.
    retry_poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.25
    #: most retries moved per tier per poll round trip.
    retry_move_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: how many times a publish is retried while the broker is unreachable, before
    #: `BrokerUnavailable`.
    publish_max_retries: Annotated[int, Field(ge=0, le=100)] = 2
    #: an event `id` / `idempotency_key` accepted within this window is answered
    #: `duplicate`; a handler that succeeded within it does not run again. `0` disables both.
    idempotency_window_s: Annotated[int, Field(ge=0)] = 24 * 3600
    #: how long a tier's queue depth reading is reused by admission control.
    admission_cache_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    #: events per round trip in `publish_many` (and `pipeline send`, HTTP batches).
    publish_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: DLQ retention: most records kept; the oldest are evicted, counted and logged.
    #: `0` = no cap.
    dlq_max_records: Annotated[int, Field(ge=0)] = 1_000_000
    #: DLQ retention: older records are evicted, counted and logged. `0` = keep forever.
    dlq_max_age_s: Annotated[float, Field(ge=0)] = 30 * 24 * 3600.0
    #: bearer token of the HTTP API; `pipeline serve` refuses to start without one
    #: unless `--insecure-local`.
    api_token: SecretStr | None = None
    #: further named bearer tokens (`PIPELINE_API_TOKENS='{"ops": "..."}'`); DLQ audit
    #: entries record the name.
    api_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    #: largest HTTP request body accepted by the API (413 above).
    api_max_body_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    #: most events in one `POST /events/batch` (413 above).
    api_max_batch: Annotated[int, Field(gt=0, le=100_000)] = 5000
    #: the tiers by name, each a `[tiers.NAME]` table. A file that declares any replaces
    #: the built-in tiers and rules.
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    #: circuit breakers by downstream name, each a `[breakers.NAME]` table; handlers name
    #: them in `@handler(..., downstreams=[...])`.
    breakers: dict[str, BreakerConfig] = Field(default_factory=dict)
    #: classification rules, `[[rules]]`, tried in order: the first match wins.
    rules: list[Rule] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlLayers(settings_cls))

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or DEFAULT_BROKER_URL

    @property
    def broker_scheme(self) -> str:
        return self.effective_broker_url.split("://", 1)[0].split("+")[0]

    @property
    def broker_is_redis(self) -> bool:
        return self.broker_scheme in ("redis", "rediss", "sentinel")

    @property
    def effective_state_url(self) -> str | None:
        if self.state_url:
            return self.state_url
        return self.effective_broker_url if self.broker_is_redis else None

    @property
    def visibility_timeout_s(self) -> float:
        if self.broker_visibility_timeout_s is not None:
            return self.broker_visibility_timeout_s
        longest = max((t.longest_unacked_s for t in self.tiers.values()), default=0.0)
        return max(VISIBILITY_FLOOR_S, longest + VISIBILITY_MARGIN_S)

    def tier(self, name: str) -> TierConfig:
        return self.tiers[name]

    def queue_for(self, tier: str) -> str:
        return self.tiers[tier].queue_name(tier)

    def tier_for_queue(self, queue: str) -> str | None:
        for name, tier in self.tiers.items():
            if tier.queue_name(name) == queue:
                return name
        return None


class TomlLayers(PydanticBaseSettingsSource):
    """The built-in ``default.toml`` with the ``PIPELINE_CONFIG`` file over it."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # whole-document source: see __call__

    def __call__(self) -> dict[str, Any]:
        data = read_default_toml()
        path = os.environ.get(CONFIG_ENV)
        if path:
            data = layer(data, read_toml(Path(path)))
        return data


def read_default_toml() -> dict[str, Any]:
    text = resources.files("pipeline").joinpath("default.toml").read_text()
    return tomllib.loads(text)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([FieldProblem(CONFIG_ENV, str(path), "file not found")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([FieldProblem(CONFIG_ENV, str(path), f"not valid TOML: {exc}")]) from None


def layer(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; declaring ``tiers`` replaces the base tiers and rules."""
    merged = dict(base)
    if "tiers" in top:
        merged.pop("rules", None)
    merged.update(top)
    return merged


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (else ``$PIPELINE_CONFIG``), the environment and defaults."""
    previous = os.environ.get(CONFIG_ENV)
    if path is not None:
        os.environ[CONFIG_ENV] = str(path)
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        raise ConfigError(_problems(exc, set(overrides))) from None
    except SettingsError as exc:  # an env value that should be JSON (a list, a table) is not
        cause = exc.__cause__ or exc
        raise ConfigError([_env_problem(str(exc), cause)]) from None
    finally:
        if path is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV, None)
            else:
                os.environ[CONFIG_ENV] = previous


def _problems(exc: pydantic.ValidationError, arguments: set[str]) -> list[FieldProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        field = ".".join(loc)
        message = err["msg"].removeprefix("Value error, ")
        source = _source_of(loc, arguments)
        problems.append(FieldProblem(field, err.get("input"), f"{message} ({source})"))
    return problems


def _env_problem(text: str, cause: BaseException) -> FieldProblem:
    """pydantic-settings says 'error parsing value for field "x" from source "Y"'."""
    field = text.split('field "', 1)[1].split('"', 1)[0] if 'field "' in text else "<env>"
    name = ENV_PREFIX + field.upper()
    value = os.environ.get(name)
    return FieldProblem(field, value, f"not valid JSON ({cause}) (from env {name})")


def _source_of(loc: list[str], arguments: set[str]) -> str:
    """Where a setting came from: an argument, an environment variable, the file or the default."""
    if loc and loc[0] in arguments:
        return "from argument"
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:depth]).upper()
        if name in os.environ:
            return f"from env {name}"
    path = os.environ.get(CONFIG_ENV)
    if path:
        return f"from {path}"
    return "from built-in default"


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
            FieldProblem("broker_url", settings.effective_broker_url,
                         f"unsupported scheme {scheme!r} "
                         f"(use one of {', '.join(SUPPORTED_SCHEMES)})")
        )
    elif not settings.effective_state_url:
        problems.append(
            FieldProblem("state_url", None,
                         "a Redis URL is required with a RabbitMQ broker (retry schedule, "
                         "delivery counts)")
        )
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
