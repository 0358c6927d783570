"""The pipeline's settings model: every setting, its type, bounds and default, and
what is derived from them (the effective broker and state URLs, the visibility
timeout, a tier's queue).

Sources, highest first: keyword arguments, ``PIPELINE_*`` variables (nested with
``__``), then the TOML layers of :mod:`pipeline.config.toml`. The ``#:`` comment
above each field is its meaning in the generated configuration reference
(``python -m tools.docgen``). Load settings with
:func:`pipeline.config.load.load_settings`, which reports bad values as a
:class:`~pipeline.errors.ConfigError`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.config.toml import TomlLayers
from pipeline.core.events import DEFAULT_MAX_PAYLOAD_BYTES
from pipeline.core.redact import path_problem
from pipeline.core.tiers import Rule, TierConfig
from pipeline.core.tokens import ApiToken, token_problem
from pipeline.core.webhooks import WEBHOOK_NAME_PATTERN, WebhookConfig
from pipeline.errors import clip

__all__ = ["DEFAULT_BROKER_URL", "ENV_PREFIX", "SECRET_FIELDS", "BreakerConfig", "Settings"]

ENV_PREFIX = "PIPELINE_"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"  # used when no broker_url is set anywhere
VISIBILITY_FLOOR_S = 60.0  # derived visibility timeouts are never shorter than this
VISIBILITY_MARGIN_S = 30.0  # added to the longest unacked time when deriving the timeout
SECRET_FIELDS = ("api_token", "api_tokens")  # settings whose values no message quotes


class BreakerConfig(BaseModel):
    """``[breakers.NAME]``: when a downstream's breaker opens and for how long."""

    model_config = ConfigDict(extra="forbid")

    #: open when at least `min_calls` calls in the window failed at this ratio or more.
    failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    #: calls in the window before the ratio applies.
    min_calls: Annotated[int, Field(ge=1)] = 20
    #: open after this many failures in a row, whatever the window says.
    consecutive_failures: Annotated[int, Field(ge=1)] = 10
    #: sliding window the ratio is computed over.
    window_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    #: cool-down: how long an open breaker stays open before it lets probes through.
    open_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    #: calls let through at once while half-open. The first success closes the breaker;
    #: it opens again only when this many probes failed (a failed probe frees its slot).
    half_open_probes: Annotated[int, Field(ge=1, le=1000)] = 2
    #: how long a half-open probe holds its slot when its outcome is never recorded (its
    #: worker was killed, it hit its hard time limit); then the slot is reclaimed. Keep it
    #: above the `time_limit_s` of every tier whose handlers call this downstream: a live
    #: probe's lease must outlast the probe, or one more probe goes through. Unset: the
    #: longest `time_limit_s` over the tiers plus 30 s, so no live probe outlives its lease
    #: (and a leaked slot stays taken that long).
    probe_lease_s: Annotated[float, Field(gt=0, le=86_400)] | None = None



class Settings(BaseSettings):
    """The pipeline's configuration. See README's configuration reference."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    #: Celery broker URL: `redis://`, `rediss://`, `sentinel://h:p;sentinel://h2:p` or
    #: `amqp://`. Unset: `redis://127.0.0.1:6379/0`, and `pipeline up` starts an embedded
    #: broker. TLS options go in the `rediss://` query; always give `ssl_cert_reqs`.
    #: `attach(app)` uses the app's broker: one set here that names another is refused.
    broker_url: str | None = None
    #: Redis holding the retry schedule, delivery counts, breakers and retry budgets.
    #: Unset: the broker, when it is Redis. Required with a RabbitMQ broker. With a Redis
    #: broker leave it unset, or name the broker's own server and database: one atomic
    #: script moves work between state and tier queues, so any other Redis is refused.
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
    #: largest accepted payload, JSON-encoded (over it: HTTP 413 for one event, a
    #: rejected item in a batch).
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
    #: what an `idempotency_key` (else `id`) is unique within at ingest, and an event id
    #: within for task ids and done marks: `source` (two producers that use the same key
    #: or id never drop each other's events) or `global` (one key space for every source,
    #: as before; an API token limited to some sources can still claim keys only with
    #: events of those sources).
    idempotency_scope: Literal["source", "global"] = "source"
    #: how long a tier's queue depth reading is reused by admission control.
    admission_cache_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    #: events per round trip in `publish_many` (and `pipeline send`, HTTP batches).
    publish_batch_size: Annotated[int, Field(ge=1, le=100_000)] = 1000
    #: DLQ retention: most records kept; the oldest are evicted, counted and logged.
    #: `0` = no cap.
    dlq_max_records: Annotated[int, Field(ge=0)] = 1_000_000
    #: DLQ retention: older records are evicted, counted and logged. `0` = keep forever.
    dlq_max_age_s: Annotated[float, Field(ge=0)] = 30 * 24 * 3600.0
    #: bearer token of the HTTP API, every scope; at least 16 characters (an empty,
    #: blank or short one refuses to load). `pipeline serve` needs it or `api_tokens`.
    api_token: SecretStr | None = None
    #: further named bearer tokens, each a string (every scope:
    #: `PIPELINE_API_TOKENS='{"ops": "..."}'`) or a `[api_tokens.NAME]` table with
    #: `token_env`, `scopes` and `sources` ([below](#api-tokens)); DLQ audit entries
    #: record the name.
    api_tokens: dict[str, ApiToken] = Field(default_factory=dict)
    #: largest HTTP request body accepted by the API (413 above); a single event's body
    #: is also capped at `max_payload_bytes` plus 4 KiB for the rest of the event.
    api_max_body_bytes: Annotated[int, Field(gt=0)] = 16 * 1024 * 1024
    #: most events in one `POST /events/batch` (413 above).
    api_max_batch: Annotated[int, Field(gt=0, le=100_000)] = 5000
    #: payload fields every view masks (DLQ list/show/stats over CLI and HTTP, the
    #: console, the task arguments Flower shows), and their values (4+ characters)
    #: inside failure messages and tracebacks there, in failure log lines and Flower's
    #: exceptions: dotted paths from the event, each segment a glob, `**` any depth,
    #: e.g. `["payload.card.number", "payload.*.token", "payload.**.password"]`. The
    #: DLQ and the queues keep the full event (and failure text) for replay.
    redact_paths: list[str] = Field(default_factory=list)
    #: signed webhook sources by name, each a `[webhooks.NAME]` table
    #: ([below](#webhooks)): deliveries to `POST /webhooks/NAME` are verified
    #: with its scheme and secret, then published with `source` = NAME.
    webhooks: dict[str, WebhookConfig] = Field(default_factory=dict)
    #: the tiers by name, each a `[tiers.NAME]` table. A file that declares any replaces
    #: the built-in tiers and rules.
    tiers: dict[str, TierConfig] = Field(default_factory=dict)
    #: circuit breakers by downstream name, each a `[breakers.NAME]` table; handlers name
    #: them in `@handler(..., downstreams=[...])`.
    breakers: dict[str, BreakerConfig] = Field(default_factory=dict)
    #: classification rules, `[[rules]]`, tried in order: the first match wins.
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("api_token")
    @classmethod
    def _real_token(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else token_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("redact_paths")
    @classmethod
    def _redact_paths(cls, value: list[str]) -> list[str]:
        problems = [f"{clip(p, 80)!r}: {why}" for p in value
                    if (why := path_problem(p)) is not None]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("webhooks")
    @classmethod
    def _webhook_names(cls, value: dict[str, WebhookConfig]) -> dict[str, WebhookConfig]:
        bad = [clip(n, 80) for n in value if not re.match(WEBHOOK_NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"webhook names {bad} must be letters, digits, '_', '.', '-' "
                             "(a URL path segment and an event source)")
        return value

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
