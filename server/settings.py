"""budgetd's resolved configuration: the frozen dataclasses the rest of the server consumes.

:class:`Settings` and its parts (:class:`ModelPrice`, :class:`DefaultTeamSettings`,
:class:`JwtSettings`) only hold checked values; :func:`server.config.load_settings` reads the
file, the environment and the overrides and builds them (and ``server.config`` re-exports
them). ``Settings()`` is the all-defaults configuration.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from zoneinfo import ZoneInfo

from server.jwt_types import DEFAULT_ALGORITHMS as DEFAULT_JWT_ALGORITHMS
from server.rules import Enforcement
from server.windows import Duration, parse_duration

__all__ = ["DefaultTeamSettings", "JwtSettings", "ModelPrice", "Settings"]


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's price in USD per token, exact."""

    input_cost_per_token: Decimal
    output_cost_per_token: Decimal


@dataclass(frozen=True, slots=True)
class DefaultTeamSettings:
    """An entry of ``litellm_settings.default_team_settings`` (budgets in USD)."""

    team_id: str
    team_alias: str | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    models: tuple[str, ...] = ()
    team_member_budget: float | None = None
    team_member_budget_duration: str | None = None
    team_member_rpm_limit: int | None = None
    team_member_tpm_limit: int | None = None

    @property
    def duration(self) -> Duration | None:
        """``budget_duration`` parsed (None: the budget never resets)."""
        return parse_duration(self.budget_duration)

    @property
    def team_member_duration(self) -> Duration | None:
        """``team_member_budget_duration`` parsed."""
        return parse_duration(self.team_member_budget_duration)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    """JWT authentication: ``general_settings.enable_jwt_auth``, ``litellm_jwtauth``, env."""

    enabled: bool = False
    team_id_upsert: bool = False
    team_id_jwt_field: str | None = None
    team_ids_jwt_field: str | None = None
    team_id_default: str | None = None
    org_id_jwt_field: str | None = None
    user_id_jwt_field: str | None = None
    user_id_upsert: bool = False
    user_email_jwt_field: str | None = None
    user_allowed_email_domain: str | None = None
    end_user_id_jwt_field: str | None = None
    admin_jwt_scope: str = "litellm_proxy_admin"
    public_key_ttl: float = 600.0
    public_key_url: str | None = None  # JWT_PUBLIC_KEY_URL (comma-separated JWKS URLs)
    audience: str | None = None  # JWT_AUDIENCE, else budgetd.jwt_audience
    issuer: str | None = None  # JWT_ISSUER, else budgetd.jwt_issuer
    public_key_pem: str | None = field(default=None, repr=False)  # budgetd.jwt_public_key
    # budgetd.jwt_algorithms; unset: DEFAULT_ALGORITHMS, plus the HS ones the secret is long
    # enough for when budgetd.jwt_hmac_secret is set.
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    hmac_secret: str | None = field(default=None, repr=False)  # budgetd.jwt_hmac_secret
    leeway: float = 30.0  # budgetd.jwt_leeway: seconds of clock skew on exp/nbf/iat


def _no_prices() -> Mapping[str, ModelPrice]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Settings:
    """budgetd's resolved configuration. ``Settings()`` is the all-defaults configuration."""

    grpc_addr: str = "127.0.0.1:50051"
    metrics_addr: str = "127.0.0.1:9464"
    bridge_listen: str = "127.0.0.1:4000"
    bridge_target: str = "127.0.0.1:50051"
    database_url: str | None = field(default=None, repr=False)
    redis_url: str | None = field(default=None, repr=False)
    redis_cluster: bool = False
    data_dir: Path = Path(".budgetd")
    master_key: str | None = field(default=None, repr=False)
    enforcement: Enforcement = Enforcement.CROSS_ONCE
    reservation_ttl: float = 600.0
    timezone: str = "UTC"
    log_level: str = "info"
    # HTTP status of a denial at a gateway (LiteLLM's 400); key problems are 401, rate 429.
    deny_status: int = 400
    # When the upstream fails or the client leaves mid-response: "release" the hold (charge
    # nothing) or charge the "estimate" that was held.
    incomplete_response: str = "release"
    # The largest request/response body budgetd reads for model, max_tokens and usage.
    max_body_bytes: int = 1024 * 1024
    # Failure policy (DESIGN §8). Redis down: decide on the exact Postgres path ("postgres")
    # or answer UNAVAILABLE ("deny"). Postgres down: keep deciding from cached keys and
    # Redis and spool acknowledged spend to disk ("spool"), or answer UNAVAILABLE ("deny").
    redis_down: str = "postgres"
    postgres_down: str = "spool"
    spool_dir: Path | None = None  # None: <data_dir>/spool
    # Seconds a key or team read from Postgres is reused: how long a change made through
    # another replica (a revoked key, a new budget) takes to apply here.
    record_cache_ttl: float = 5.0
    # Quota leasing (server/storage/leasing.py): seconds a replica admits from one lease of
    # headroom before asking Redis again; 0 sends every decision to Redis.
    lease_seconds: float = 1.0
    prices: Mapping[str, ModelPrice] = field(default_factory=_no_prices)
    default_team_settings: tuple[DefaultTeamSettings, ...] = ()
    jwt: JwtSettings = field(default_factory=JwtSettings)
    success_callback: tuple[str, ...] = ()
    failure_callback: tuple[str, ...] = ()
    metrics_enabled: bool = True
    multi_instance_rate_limiting: bool = False
    config_path: Path | None = None

    @property
    def spool_path(self) -> Path:
        """Where RecordSpend spools acknowledged spend while Postgres is down."""
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def tzinfo(self) -> dt.tzinfo:
        """The time zone budget windows are aligned in."""
        return dt.UTC if self.timezone == "UTC" else ZoneInfo(self.timezone)
