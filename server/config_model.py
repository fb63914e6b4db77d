"""The shape of budgetd's config file: the pydantic models of its sections.

The file is LiteLLM's ``config.yaml`` plus a ``budgetd:`` section. The ``budgetd:`` section is
ours and forbids unknown keys. LiteLLM's sections accept the keys LiteLLM documents (the ones
budgetd does not use are listed in :mod:`server.config_litellm_keys` and dropped), so a typo is
still caught. Each field's type runs one of the value checks of :mod:`server.config_values`
(which its importers import from there directly). This module only
describes and checks; :mod:`server.config` loads the file, layers environment variables and
command-line overrides over it and builds ``Settings``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Final, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from server.config_litellm_keys import LITELLM_IGNORED_KEYS
from server.config_values import (
    parse_address,
    parse_body_bytes,
    parse_bool,
    parse_budget_duration,
    parse_cache_ttl,
    parse_count,
    parse_deny_status,
    parse_enforcement,
    parse_incomplete_response,
    parse_jwt_algorithms,
    parse_jwt_hmac_secret,
    parse_jwt_leeway,
    parse_jwt_public_key,
    parse_log_level,
    parse_path,
    parse_postgres_down,
    parse_postgres_url,
    parse_price,
    parse_redis_down,
    parse_redis_url,
    parse_seconds,
    parse_secret,
    parse_text,
    parse_timezone,
    parse_usd,
)
from server.rules import Enforcement

__all__ = [
    "BudgetdSection",
    "DefaultTeamEntry",
    "FileConfig",
    "GeneralSection",
    "JwtAuthSection",
    "LitellmParams",
    "LitellmSection",
    "ModelEntry",
    "ModelInfo",
    "PriceEntry",
    "RouterSection",
    "Section",
    "section_at",
    "type_at",
]


def _checked(parse: Callable[[object], object]) -> BeforeValidator:
    return BeforeValidator(parse)


Text = Annotated[str, _checked(parse_text)]
Secret = Annotated[str, _checked(parse_secret)]
Flag = Annotated[bool, _checked(parse_bool)]
Count = Annotated[int, _checked(parse_count)]
Usd = Annotated[float, _checked(parse_usd)]
Price = Annotated[Decimal, _checked(parse_price)]
BudgetDuration = Annotated[str, _checked(parse_budget_duration)]
Seconds = Annotated[float, _checked(parse_seconds)]
Address = Annotated[str, _checked(parse_address)]
PostgresUrl = Annotated[str, _checked(parse_postgres_url)]
RedisUrl = Annotated[str, _checked(parse_redis_url)]
EnforcementMode = Annotated[Enforcement, _checked(parse_enforcement)]
LogLevel = Annotated[str, _checked(parse_log_level)]
DenyStatus = Annotated[int, _checked(parse_deny_status)]
IncompleteResponse = Annotated[str, _checked(parse_incomplete_response)]
BodyBytes = Annotated[int, _checked(parse_body_bytes)]
RedisDown = Annotated[str, _checked(parse_redis_down)]
PostgresDown = Annotated[str, _checked(parse_postgres_down)]
CacheTtl = Annotated[float, _checked(parse_cache_ttl)]
TimeZoneName = Annotated[str, _checked(parse_timezone)]
DataDir = Annotated[Path, _checked(parse_path)]
JwtAlgorithms = Annotated[tuple[str, ...], _checked(parse_jwt_algorithms)]
JwtPublicKey = Annotated[str, _checked(parse_jwt_public_key)]
JwtHmacSecret = Annotated[str, _checked(parse_jwt_hmac_secret)]
JwtLeeway = Annotated[float, _checked(parse_jwt_leeway)]


# --------------------------------------------------------------------------------------------
# The file's shape. Every field is optional (None = not set in the file) so that environment
# variables and defaults can be layered over exactly what the file says.
# --------------------------------------------------------------------------------------------


class Section(BaseModel):
    """A mapping in the file: unknown keys are errors, except the section's ignored keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    SECTION: ClassVar[str] = "-"

    @classmethod
    def ignores(cls, key: str) -> bool:
        """Whether ``key`` is accepted from LiteLLM's config and dropped unread."""
        return key in LITELLM_IGNORED_KEYS.get(cls.SECTION, frozenset())

    @classmethod
    def known_keys(cls) -> frozenset[str]:
        """Every key this section accepts (for "did you mean" hints)."""
        return frozenset(cls.model_fields) | LITELLM_IGNORED_KEYS.get(cls.SECTION, frozenset())

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        # What is left after dropping is checked by extra="forbid", which reports each
        # unknown key at its own location.
        if isinstance(data, Mapping):
            return {
                key: value
                for key, value in data.items()
                if not (isinstance(key, str) and key not in cls.model_fields and cls.ignores(key))
            }
        return data


_PRICE_KEYS: Final = ("input_cost_per_token", "output_cost_per_token")


class _ModelParams(Section):
    """``litellm_params`` / ``model_info`` of a model_list entry: open, except prices."""

    SECTION: ClassVar[str] = "cost_keys"

    input_cost_per_token: Price | None = None
    output_cost_per_token: Price | None = None

    @classmethod
    def ignores(cls, key: str) -> bool:
        """Every provider parameter is accepted, except what looks like a misspelled price.

        A misspelling is an unknown key close to ``input_cost_per_token`` or
        ``output_cost_per_token`` that is not one of LiteLLM's refinements of them
        (``input_cost_per_token_batches``, ``..._above_128k_tokens``, ``..._flex``...).
        """
        if super().ignores(key):
            return True
        if any(key.startswith(f"{name}_") for name in _PRICE_KEYS):
            return True
        return not difflib.get_close_matches(key, _PRICE_KEYS, n=1, cutoff=0.8)


class LitellmParams(_ModelParams):
    """``model_list[].litellm_params``."""


class ModelInfo(_ModelParams):
    """``model_list[].model_info``."""


class ModelEntry(Section):
    """An entry of LiteLLM's ``model_list``."""

    model_name: Text
    litellm_params: LitellmParams | None = None
    model_info: ModelInfo | None = None


class JwtAuthSection(Section):
    """``litellm_jwtauth`` (LiteLLM's ``LiteLLM_JWTAuth``)."""

    SECTION: ClassVar[str] = "litellm_jwtauth"

    team_id_upsert: Flag | None = None
    team_id_jwt_field: Text | None = None
    team_ids_jwt_field: Text | None = None
    team_id_default: Text | None = None
    org_id_jwt_field: Text | None = None
    user_id_jwt_field: Text | None = None
    user_id_upsert: Flag | None = None
    user_email_jwt_field: Text | None = None
    user_allowed_email_domain: Text | None = None
    end_user_id_jwt_field: Text | None = None
    admin_jwt_scope: Text | None = None
    public_key_ttl: Seconds | None = None


class GeneralSection(Section):
    """``general_settings``."""

    SECTION: ClassVar[str] = "general_settings"

    master_key: Secret | None = None
    database_url: PostgresUrl | None = None
    enable_jwt_auth: Flag | None = None
    # LiteLLM documents litellm_jwtauth here; the seed puts it at the top level.
    litellm_jwtauth: JwtAuthSection | None = None


class DefaultTeamEntry(Section):
    """An entry of ``litellm_settings.default_team_settings``."""

    SECTION: ClassVar[str] = "default_team_settings[]"

    team_id: Text
    team_alias: Text | None = None
    max_budget: Usd | None = None
    budget_duration: BudgetDuration | None = None
    tpm_limit: Count | None = None
    rpm_limit: Count | None = None
    models: tuple[Text, ...] | None = None
    team_member_budget: Usd | None = None
    team_member_budget_duration: BudgetDuration | None = None
    team_member_rpm_limit: Count | None = None
    team_member_tpm_limit: Count | None = None


class LitellmSection(Section):
    """``litellm_settings``."""

    SECTION: ClassVar[str] = "litellm_settings"

    default_team_settings: tuple[DefaultTeamEntry, ...] | None = None
    success_callback: tuple[Text, ...] | None = None
    failure_callback: tuple[Text, ...] | None = None


class RouterSection(Section):
    """``router_settings``: nothing budgetd uses."""

    SECTION: ClassVar[str] = "router_settings"


class PriceEntry(Section):
    """An entry of ``budgetd.prices``: USD per token."""

    input_cost_per_token: Price
    output_cost_per_token: Price


class BudgetdSection(Section):
    """The ``budgetd:`` section: budgetd's own settings; unknown keys are errors."""

    grpc_addr: Address | None = None
    metrics_addr: Address | None = None
    bridge_listen: Address | None = None
    bridge_target: Address | None = None
    database_url: PostgresUrl | None = None
    redis_url: RedisUrl | None = None
    redis_cluster: Flag | None = None
    data_dir: DataDir | None = None
    enforcement: EnforcementMode | None = None
    reservation_ttl: Seconds | None = None
    timezone: TimeZoneName | None = None
    log_level: LogLevel | None = None
    metrics: Flag | None = None
    prices: dict[Text, PriceEntry] | None = None
    deny_status: DenyStatus | None = None
    incomplete_response: IncompleteResponse | None = None
    max_body_bytes: BodyBytes | None = None
    redis_down: RedisDown | None = None
    postgres_down: PostgresDown | None = None
    spool_dir: DataDir | None = None
    record_cache_ttl: CacheTtl | None = None
    lease_seconds: CacheTtl | None = None
    # JWT verification (general_settings.enable_jwt_auth); JWT_AUDIENCE / JWT_ISSUER win.
    jwt_public_key: JwtPublicKey | None = None
    jwt_algorithms: JwtAlgorithms | None = None
    jwt_hmac_secret: JwtHmacSecret | None = None
    jwt_leeway: JwtLeeway | None = None
    jwt_audience: Text | None = None
    jwt_issuer: Text | None = None


class FileConfig(Section):
    """The whole file."""

    SECTION: ClassVar[str] = ""

    model_list: tuple[ModelEntry, ...] | None = None
    general_settings: GeneralSection | None = None
    litellm_settings: LitellmSection | None = None
    litellm_jwtauth: JwtAuthSection | None = None
    router_settings: RouterSection | None = None
    # Checked and read by the loader before the rest (they feed os.environ/NAME).
    environment_variables: dict[Text, Any] | None = None
    budgetd: BudgetdSection | None = None


# --------------------------------------------------------------------------------------------
# Locations: which declared type a path in the file leads to.
# --------------------------------------------------------------------------------------------


def type_at(loc: tuple[object, ...], root: type[Section] = FileConfig) -> object | None:
    """The declared type a location in the file leads to, or None when no field declares it.

    None means the location is free-form or accepted-and-ignored: budgetd never reads it.
    """
    current: object = root
    for part in loc:
        current = _step(_unwrap(current), part)
        if current is None:
            return None
    return _unwrap(current)


def section_at(loc: tuple[object, ...]) -> type[Section] | None:
    """The section model whose keys live at ``loc``, if any."""
    found = type_at(loc)
    if isinstance(found, type) and issubclass(found, Section):
        return found
    return None


def _unwrap(tp: object) -> object:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, UnionType):
            members = [arg for arg in get_args(tp) if arg is not NoneType]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def _step(tp: object, part: object) -> object | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(part) if isinstance(part, str) else None
        return None if field is None else field.annotation
    origin = get_origin(tp)
    args = get_args(tp)
    found: object = None
    if origin in (list, tuple) and isinstance(part, int) and args:
        found = args[0]
    elif origin is dict and len(args) == 2:
        found = args[1]
    return found
