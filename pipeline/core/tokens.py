"""API tokens: what a bearer token must look like, and what each one may do.

A token is at least :data:`MIN_TOKEN_CHARS` characters with no whitespace: an empty,
blank or short one refuses to load (every process), so it can never open the API.
``api_token`` carries every scope. A named token (``api_tokens.NAME``) is either a
plain string (every scope, as before scopes existed) or a table whose secret is
read from the environment variable ``token_env``, so that a config file never holds
a secret::

    [api_tokens.game]
    token_env = "GAME_API_TOKEN"
    scopes = ["ingest"]
    sources = ["game-server", "game-*"]

Scopes: ``ingest`` (``POST /events``, ``/events/batch``; limited to ``sources``
when given), ``dlq:read`` (``GET /dlq...``), ``dlq:write`` (replay, purge).
:func:`credentials` turns the settings into the :class:`Credential` s the API
checks; a ``token_env`` that is unset, empty or short is a problem then, at
``pipeline serve`` / ``up`` / ``config check``, not in a worker that never serves.
"""

from __future__ import annotations

import fnmatch
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from pipeline.errors import FieldProblem

__all__ = ["ALL_SCOPES", "DEFAULT_TOKEN_NAME", "MIN_TOKEN_CHARS", "TOKEN_HINT", "ApiToken",
           "Credential", "Scope", "TokenSettings", "credentials", "find_credential", "token_notes",
           "token_problem"]

Scope = Literal["ingest", "dlq:read", "dlq:write"]
ALL_SCOPES: tuple[Scope, ...] = ("ingest", "dlq:read", "dlq:write")
MIN_TOKEN_CHARS = 16  # shortest bearer token accepted (token_urlsafe(32) gives 43)
DEFAULT_TOKEN_NAME = "default"  # what audit entries call api_token
TOKEN_HINT = ('make one with: python -c "import secrets; print(secrets.token_urlsafe(32))"')
SECRET_MASK = "***"  # stands in for a token in any message
PLACEHOLDER_PREFIX = "change-me"  # .env.example's placeholders: never a real token
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"  # what token_env may name


def token_problem(value: str) -> str | None:
    """Why ``value`` cannot be a bearer token (the message never quotes it), or None."""
    if not value:
        return f"empty; a token must be at least {MIN_TOKEN_CHARS} characters, {TOKEN_HINT}"
    if not value.strip():
        return f"blank; a token must be at least {MIN_TOKEN_CHARS} characters, {TOKEN_HINT}"
    if any(c.isspace() for c in value):
        return f"contains whitespace, which an Authorization header cannot carry; {TOKEN_HINT}"
    if value.lower().startswith(PLACEHOLDER_PREFIX):
        return f"still the .env.example placeholder; {TOKEN_HINT}"
    if len(value) < MIN_TOKEN_CHARS:
        return (f"{len(value)} characters, shorter than the {MIN_TOKEN_CHARS} required; "
                f"{TOKEN_HINT}")
    return None


class ApiToken(BaseModel):
    """A named API token: where its secret comes from and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: environment variable that holds the token (at least 16 characters); a table
    #: names its secret this way, so no config file holds one.
    token_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    #: the token itself, set only by the plain-string form
    #: (`PIPELINE_API_TOKENS='{"ops": "..."}'`, `PIPELINE_API_TOKENS__OPS=...`); a table
    #: that names it is refused: use `token_env`.
    token: SecretStr | None = None
    #: what the token may do: `ingest`, `dlq:read`, `dlq:write` (replay, purge).
    #: Unset: all three (`pipeline config check` says so).
    scopes: Annotated[list[Scope], Field(min_length=1)] | None = None
    #: sources (globs) an `ingest` token may publish for; empty: any source.
    sources: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _plain_string(cls, data: Any) -> Any:
        if isinstance(data, str | SecretStr):
            return {"token": data}
        if isinstance(data, Mapping) and "token" in data:
            raise ValueError("a token table names its secret with token_env (an environment "
                             "variable), never inline")
        return data

    @model_validator(mode="after")
    def _one_secret(self) -> ApiToken:
        if self.token is None and self.token_env is None:
            raise ValueError("name the environment variable holding the token: token_env")
        if self.token is not None:
            problem = token_problem(self.token.get_secret_value())
            if problem is not None:
                raise ValueError(f"token {problem}")
        if self.sources and self.scopes is not None and "ingest" not in self.scopes:
            raise ValueError("sources limit ingest, but this token has no ingest scope")
        return self

    @property
    def granted(self) -> frozenset[str]:
        return frozenset(self.scopes if self.scopes is not None else ALL_SCOPES)


@dataclass(frozen=True)
class Credential:
    """One usable token: its name (audit entries record it), secret, scopes, sources."""

    name: str
    secret: str = field(repr=False)
    scopes: frozenset[str] = frozenset(ALL_SCOPES)
    sources: tuple[str, ...] = ()  # globs; empty: any source

    @property
    def caller(self) -> str:
        """How audit entries and logs name this token."""
        return f"token:{self.name}"

    def may_publish(self, source: str) -> bool:
        return not self.sources or any(fnmatch.fnmatchcase(source, p) for p in self.sources)


def find_credential(known: Sequence[Credential], offered: str) -> Credential | None:
    """The credential whose secret ``offered`` is, or None; every secret is compared in
    constant time, with no early exit (the bearer header and the console's login)."""
    given = offered.encode()
    found: Credential | None = None
    for cred in known:
        if secrets.compare_digest(given, cred.secret.encode()) and given:
            found = cred
    return found


class TokenSettings(Protocol):
    """What :func:`credentials` reads of :class:`pipeline.config.model.Settings`."""

    @property
    def api_token(self) -> SecretStr | None: ...

    @property
    def api_tokens(self) -> Mapping[str, ApiToken]: ...


def credentials(settings: TokenSettings, environ: Mapping[str, str] | None = None,
                ) -> tuple[list[Credential], list[FieldProblem]]:
    """The settings' tokens, secrets resolved from ``environ`` (default ``os.environ``),
    and the problems that keep some from being used (values never shown)."""
    env = os.environ if environ is None else environ
    found: list[Credential] = []
    problems: list[FieldProblem] = []
    if settings.api_token is not None:
        found.append(Credential(DEFAULT_TOKEN_NAME, settings.api_token.get_secret_value()))
        if DEFAULT_TOKEN_NAME in settings.api_tokens:
            problems.append(FieldProblem(
                f"api_tokens.{DEFAULT_TOKEN_NAME}", None,
                f"{DEFAULT_TOKEN_NAME!r} is api_token's name in the audit log; rename this one"))
    for name, spec in settings.api_tokens.items():
        secret = spec.token.get_secret_value() if spec.token is not None else None
        if secret is None and spec.token_env is not None:
            secret = env.get(spec.token_env)
            why = (f"is not set; {TOKEN_HINT}" if secret is None
                   else token_problem(secret))
            if why is not None:
                problems.append(FieldProblem(f"api_tokens.{name}.token_env", spec.token_env,
                                             f"${spec.token_env}: {why}"))
                continue
        assert secret is not None
        found.append(Credential(name, secret, spec.granted, tuple(spec.sources)))
    seen: dict[str, str] = {}
    for cred in found:
        if cred.secret in seen:
            problems.append(FieldProblem(
                f"api_tokens.{cred.name}", SECRET_MASK,
                f"the same token as {seen[cred.secret]!r}: audit entries could not tell "
                "them apart"))
        seen.setdefault(cred.secret, cred.name)
    return found, problems


def token_notes(settings: TokenSettings) -> list[str]:
    """What ``pipeline config check`` explains about tokens that limit nothing."""
    notes = []
    for name, spec in settings.api_tokens.items():
        if spec.scopes is None:
            notes.append(f"api_tokens.{name}: no scopes listed, so it may do everything "
                         f"({', '.join(ALL_SCOPES)}, any source), as api_token does; "
                         "limit it with a table: token_env = \"...\", scopes = [...]")
    return notes
