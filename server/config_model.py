"""The shape of budgetd's config file, and the checks every configured value goes through.

The file is LiteLLM's ``config.yaml`` plus a ``budgetd:`` section. The ``budgetd:`` section is
ours and forbids unknown keys. LiteLLM's sections accept the keys LiteLLM documents (the ones
budgetd does not use are listed in :data:`LITELLM_IGNORED_KEYS` and dropped), so a typo is
still caught. This module only describes and checks; :mod:`server.config` loads the file,
layers environment variables and command-line overrides over it and builds ``Settings``.

The ``parse_*`` functions take a raw value (from YAML, an environment variable or the command
line) and return the checked value or raise ``ValueError`` with a message that does not name
the key (the caller prefixes where the value came from).
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Final, Union, get_args, get_origin
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, model_validator

from server.jwt_types import HMAC_MIN_SECRET_BYTES, SUPPORTED_ALGORITHMS
from server.money import MoneyError, usd_to_nanos
from server.rules import Enforcement
from server.windows import DurationError, parse_duration

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
POSTGRES_SCHEMES: Final = ("postgres", "postgresql")
REDIS_SCHEMES: Final = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
MAX_TTL_SECONDS: Final = 86_400.0
# A per-token price above this is certainly a mistake (the money module's largest amount).
_MAX_PRICE = Decimal(1_000_000_000)
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?$"
)
_PORT = re.compile(r"^[0-9]{1,5}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# --------------------------------------------------------------------------------------------
# Value checks, shared by the file model, environment variables and command-line overrides.
# --------------------------------------------------------------------------------------------


def describe(value: object) -> str:
    """A short, YAML-flavoured rendering of a rejected value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str | Decimal):
        text = repr(value) if not isinstance(value, Decimal) else str(value)
        return text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _text(value: object, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be {what} (got {describe(value)})")
    return value


def parse_text(value: object) -> str:
    """A non-empty string."""
    text = _text(value)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def parse_secret(value: object) -> str:
    """A non-empty string that is never echoed in messages (keys, passwords)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string (got a {type(value).__name__})")
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def parse_bool(value: object) -> bool:
    """``true``/``false`` (YAML booleans, or those words in any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"must be true or false (got {describe(value)})")


def parse_count(value: object) -> int:
    """A whole number >= 0 (rpm/tpm limits)."""
    number = _whole_number(value)
    if number is None:
        raise ValueError(f"must be a whole number (got {describe(value)})")
    if number < 0:
        raise ValueError(f"must not be negative (got {number})")
    return number


def _whole_number(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", value):
        return int(value)
    return None


def parse_usd(value: object) -> float:
    """A USD amount >= 0 that budgetd can count exactly (nano-USD)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of USD (got {describe(value)})")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"must be a number of USD (got {describe(value)})") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number (got {describe(value)})")
    if number < 0:
        raise ValueError(f"must not be negative (got {describe(value)})")
    try:
        nanos = usd_to_nanos(number, field="amount")
    except MoneyError as exc:
        raise ValueError(str(exc).removeprefix("amount ")) from None
    if number > 0 and nanos == 0:
        raise ValueError(f"must be 0 or at least 1e-09 USD, budgetd's unit (got {number!r})")
    return number


def parse_price(value: object) -> Decimal:
    """A USD price per token, exact: ``Decimal(str(value))``, >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ValueError(f"must be a number (got {describe(value)})")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"must be a number (got {describe(value)})") from None
    if not price.is_finite():
        raise ValueError(f"must be a finite number (got {describe(value)})")
    if price < 0:
        raise ValueError(f"must not be negative (got {describe(value)})")
    if price > _MAX_PRICE:
        raise ValueError(f"is not a plausible price per token (got {describe(value)})")
    return price


def parse_budget_duration(value: object) -> str:
    """A ``budget_duration`` (``1s``, ``1m``, ``1h``, ``1d``, ``30d``, ``1mo``...)."""
    text = _text(value, 'a duration string such as "1d"')
    try:
        parse_duration(text, field="")
    except DurationError as exc:
        raise ValueError(str(exc).strip()) from None
    return text


def parse_seconds(value: object) -> float:
    """A positive number of seconds, at most one day: a number or a duration like ``10m``."""
    seconds: float
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of seconds or a duration (got {describe(value)})")
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = _duration_seconds(value)
    else:
        seconds = float(value)
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"must be more than 0 seconds (got {describe(value)})")
    if seconds > MAX_TTL_SECONDS:
        raise ValueError(f"must be at most 1 day, 86400 seconds (got {describe(value)})")
    return seconds


def _duration_seconds(text: str) -> float:
    problem = (
        f"must be a number of seconds or a duration such as 90s, 10m or 1h (got {describe(text)})"
    )
    try:
        duration = parse_duration(text.strip(), field="")
    except DurationError:
        raise ValueError(problem) from None
    if duration is None or duration.months:
        raise ValueError(problem)
    return float(duration.seconds)


def parse_address(value: object) -> str:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``), port 0-65535."""
    text = _text(value, 'a "HOST:PORT" string')
    example = "HOST:PORT, for example 127.0.0.1:50051 or [::1]:50051"
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError(f"must be {example} (got {describe(text)})")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (got {describe(text)})") from None
        port = rest[1:]
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise ValueError(f"must be {example}: the port is missing (got {describe(text)})")
        if ":" in host:
            raise ValueError(f"an IPv6 host goes in brackets, as in [::1]:50051 (got {text!r})")
        if not host:
            raise ValueError(f"the host is empty; use 0.0.0.0 for every interface (got {text!r})")
        if not _HOSTNAME.match(host):
            raise ValueError(f"{host!r} is not a host name or IP address (got {text!r})")
    if not _PORT.match(port) or int(port) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535 (got {describe(text)})")
    return text


def _url(value: object, schemes: tuple[str, ...]) -> str:
    # URLs may carry passwords: messages show the scheme, never the whole value.
    names = [f"{scheme}://" for scheme in schemes]
    wanted = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
    if not isinstance(value, str):
        raise ValueError(f"must be a URL starting with {wanted} (got a {type(value).__name__})")
    match = _SCHEME.match(value.strip())
    if match is None:
        raise ValueError(f"must be a URL starting with {wanted} (got a value with no scheme)")
    if match.group(1).lower() not in schemes:
        raise ValueError(f"must be a URL starting with {wanted} (got a {match.group(1)}:// URL)")
    return value.strip()


def parse_postgres_url(value: object) -> str:
    """A ``postgres://`` or ``postgresql://`` URL."""
    return _url(value, POSTGRES_SCHEMES)


def parse_redis_url(value: object) -> str:
    """A Redis URL: ``redis://``, ``rediss://``, ``unix://`` or a ``+cluster`` variant."""
    return _url(value, REDIS_SCHEMES)


def parse_http_urls(value: object) -> str:
    """One or more comma-separated ``http(s)://`` URLs (``JWT_PUBLIC_KEY_URL``)."""
    text = _text(value)
    for part in text.split(","):
        _url(part, ("https", "http"))
    return text


def _choice(value: object, choices: tuple[str, ...]) -> str:
    text = value.strip().lower() if isinstance(value, str) else None
    if text not in choices:
        raise ValueError(f"must be one of {', '.join(choices)} (got {describe(value)})")
    return text


def parse_enforcement(value: object) -> Enforcement:
    """``cross_once`` or ``never_exceed``."""
    return Enforcement(_choice(value, tuple(mode.value for mode in Enforcement)))


def parse_deny_status(value: object) -> int:
    """The HTTP status of a budget denial at a gateway: 400-499 (LiteLLM answers 400)."""
    number = _whole_number(value)
    if number is None or not 400 <= number <= 499:
        raise ValueError(f"must be an HTTP status from 400 to 499 (got {describe(value)})")
    return number


INCOMPLETE_RESPONSE_CHOICES = ("release", "estimate")


def parse_incomplete_response(value: object) -> str:
    """What a hold becomes when the upstream fails or the client goes away mid-response."""
    return _choice(value, INCOMPLETE_RESPONSE_CHOICES)


REDIS_DOWN_CHOICES = ("postgres", "deny")
POSTGRES_DOWN_CHOICES = ("spool", "deny")
MAX_RECORD_CACHE_TTL: Final = 3600.0


def parse_redis_down(value: object) -> str:
    """What decisions do while Redis is down: the exact ``postgres`` path, or ``deny``."""
    return _choice(value, REDIS_DOWN_CHOICES)


def parse_postgres_down(value: object) -> str:
    """What RecordSpend does while Postgres is down: ``spool`` to local disk, or ``deny``."""
    return _choice(value, POSTGRES_DOWN_CHOICES)


def parse_cache_ttl(value: object) -> float:
    """Seconds a cached key or team is used without asking Postgres: 0 to 3600."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of seconds or a duration (got {describe(value)})")
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = _duration_seconds(value)
    else:
        seconds = float(value)
    if not 0 <= seconds <= MAX_RECORD_CACHE_TTL:  # also refuses NaN
        raise ValueError(f"must be from 0 to 3600 seconds (got {describe(value)})")
    return seconds


def parse_body_bytes(value: object) -> int:
    """A body size limit in bytes: 1 KiB to 64 MiB."""
    number = _whole_number(value)
    if number is None or not 1024 <= number <= 64 * 1024 * 1024:
        raise ValueError(f"must be a number of bytes from 1024 to 67108864 (got {describe(value)})")
    return number


def parse_log_level(value: object) -> str:
    """debug, info, warning or error (any case)."""
    return _choice(value, LOG_LEVELS)


def parse_timezone(value: object) -> str:
    """An IANA time zone name such as ``UTC`` or ``Europe/Paris``."""
    text = _text(value, "an IANA time zone name")
    if text == "UTC":
        return text
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"is not a known time zone, use an IANA name such as UTC or Europe/Paris "
            f"(got {describe(text)})"
        ) from None
    return text


def parse_path(value: object) -> Path:
    """A directory path (``~`` expanded)."""
    if isinstance(value, Path):
        return value.expanduser()
    return Path(parse_text(value)).expanduser()


MAX_JWT_LEEWAY: Final = 300.0
_JWT_ALGORITHM_NAMES: Final = {name.lower(): name for name in SUPPORTED_ALGORITHMS}


def parse_jwt_algorithms(value: object) -> tuple[str, ...]:
    """The JWT algorithm allow-list: a list (or comma-separated string) of names, any case."""
    items: list[object]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ValueError(
            f"must be a list of JWT algorithms such as [RS256] (got {describe(value)})"
        )
    names: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"must list algorithm names (got {describe(item)})")
        if item.strip().lower() == "none":
            raise ValueError("must not list 'none': budgetd never accepts unsigned JWTs")
        name = _JWT_ALGORITHM_NAMES.get(item.strip().lower())
        if name is None:
            raise ValueError(
                f"{item!r} is not a JWT signature algorithm budgetd supports "
                f"(use {', '.join(SUPPORTED_ALGORITHMS)})"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("must list at least one algorithm")
    return tuple(names)


def parse_jwt_public_key(value: object) -> str:
    """A PEM public key (or certificate) that verifies JWTs: RSA >= 2048 bits, EC, EdDSA."""
    text = parse_text(value)
    # Only a configured key loads cryptography (server.jwt_auth), not every start.
    from server.jwt_keys import load_public_key_pem  # noqa: PLC0415

    load_public_key_pem(text)  # raises ValueError saying what is wrong
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")  # one-line PEM from an environment variable
    return text.strip() + "\n"


def parse_jwt_hmac_secret(value: object) -> str:
    """A shared secret for HS256/384/512 JWTs: at least 32 bytes, and not a PEM key."""
    secret = parse_secret(value)
    if "-----BEGIN" in secret:
        raise ValueError(
            "is a PEM key, not a shared secret; put a public key in budgetd.jwt_public_key"
        )
    size = len(secret.encode())
    if size < HMAC_MIN_SECRET_BYTES:
        raise ValueError(
            f"must be at least {HMAC_MIN_SECRET_BYTES} bytes long (RFC 7518 section 3.2; "
            f"got {size})"
        )
    return secret


def parse_jwt_leeway(value: object) -> float:
    """Seconds of clock skew allowed on JWT exp/nbf/iat: 0 to 300."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of seconds or a duration (got {describe(value)})")
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = _duration_seconds(value)
    else:
        seconds = float(value)
    if not 0 <= seconds <= MAX_JWT_LEEWAY:  # also refuses NaN
        raise ValueError(f"must be from 0 to {MAX_JWT_LEEWAY:g} seconds (got {describe(value)})")
    return seconds


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
# LiteLLM keys budgetd accepts and ignores: the one list. A LiteLLM config.yaml should load
# unchanged, so every key LiteLLM documents for these sections is accepted
# (https://docs.litellm.ai/docs/proxy/config_settings, .../token_auth, .../team_budgets);
# the keys budgetd uses are the fields of the models below. A key in neither is an error, so
# typos are caught. Route/RBAC, logging, caching and routing settings are the gateway's or
# LiteLLM's business, not a budget authority's.
# --------------------------------------------------------------------------------------------

LITELLM_IGNORED_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset(
        {  # other top-level sections of LiteLLM's config.yaml
            "callback_settings", "guardrails", "credential_list", "mcp_servers",
            "assistant_settings", "files_settings", "finetune_settings",
            "vector_store_registry", "search_tools", "prompts",
        }
    ),
    "general_settings": frozenset(
        {
            "completion_model", "disable_spend_logs", "disable_spend_updates",
            "disable_master_key_return", "disable_retry_on_max_parallel_request_limit_error",
            "disable_reset_budget", "disable_adding_master_key_hash_to_db",
            "disable_responses_id_security", "enforce_user_param",
            "reject_clientside_metadata_tags", "allowed_routes", "key_management_system",
            "database_connection_pool_limit", "database_connection_timeout",
            "allow_requests_on_db_unavailable", "custom_auth", "max_parallel_requests",
            "global_max_parallel_requests", "infer_model_from_keys",
            "background_health_checks", "health_check_interval", "health_check_details",
            "alerting", "alerting_threshold", "alerting_args", "alert_types",
            "alert_to_webhook_url", "use_client_credentials_pass_through_routes",
            "public_routes", "admin_only_routes", "enforced_params", "enable_oauth2_auth",
            "enable_oauth2_proxy_auth", "oauth2_config_mappings", "use_x_forwarded_for",
            "service_account_settings", "image_generation_model", "embedding_model",
            "moderation_model", "store_model_in_db", "supported_db_objects",
            "user_mcp_management_mode", "store_prompts_in_spend_logs", "max_request_size_mb",
            "max_response_size_mb", "proxy_budget_rescheduler_min_time",
            "proxy_budget_rescheduler_max_time", "proxy_batch_write_at",
            "proxy_batch_polling_interval", "custom_key_generate", "custom_sso", "allowed_ips",
            "default_team_disabled", "key_management_settings", "allow_user_auth",
            "user_api_key_cache_ttl", "disable_prisma_schema_update",
            "litellm_key_header_name", "user_header_name", "allow_client_side_credentials",
            "use_azure_key_vault", "use_google_kms", "spend_report_frequency",
            "ui_access_mode", "litellm_license", "pass_through_endpoints",
            "forward_openai_org_id", "forward_client_headers_to_llm_api",
            "maximum_spend_logs_retention_period", "maximum_spend_logs_retention_interval",
            "use_redis_transaction_buffer",
        }
    ),
    "litellm_settings": frozenset(
        {
            "callbacks", "service_callbacks", "turn_off_message_logging",
            "redact_user_api_key_info", "redact_messages_in_exceptions",
            "langfuse_default_tags", "request_timeout", "force_ipv4", "json_logs",
            "set_verbose", "drop_params", "modify_params", "num_retries", "allowed_fails",
            "default_fallbacks", "fallbacks", "content_policy_fallbacks",
            "context_window_fallbacks", "mcp_aliases", "cache", "cache_params",
            "enable_preview_features", "disable_end_user_cost_tracking",
            "disable_end_user_cost_tracking_prometheus_only", "key_generation_settings",
            "disable_add_transform_inline_image_block",
            "use_chat_completions_url_for_anthropic_messages", "disable_hf_tokenizer_download",
            "enable_json_schema_validation", "enable_key_alias_format_validation",
            "disable_copilot_system_to_assistant", "LITELLM_DISABLE_STOP_SEQUENCE_LIMIT",
            "max_budget", "budget_duration", "max_internal_user_budget",
            "internal_user_budget_duration", "max_end_user_budget",
            "default_internal_user_params", "default_key_generate_params",
            "upperbound_key_generate_params", "store_audit_logs", "guardrails",
            "return_response_headers", "ssl_verify", "telemetry",
            "prometheus_initialize_budget_metrics", "custom_prometheus_metadata_labels",
            "require_auth_for_metrics_endpoint", "public_teams", "global_disable_no_log_param",
            "disable_token_counter", "s3_callback_params", "extra_spend_tag_headers",
        }
    ),
    "litellm_jwtauth": frozenset(
        {
            "admin_allowed_routes", "team_jwt_scope", "team_allowed_routes",
            "upsert_sso_user_to_team", "user_roles_jwt_field", "user_allowed_roles",
            "public_allowed_routes", "enforce_rbac", "roles_jwt_field", "role_mappings",
            "object_id_jwt_field", "scope_mappings", "enforce_scope_based_access",
            "enforce_team_based_model_access", "custom_validate", "jwt_litellm_role_map",
            "sync_user_role_and_teams",
        }
    ),
    "router_settings": frozenset(
        {
            "routing_strategy", "routing_strategy_args", "redis_host", "redis_password",
            "redis_port", "redis_db", "redis_url", "enable_pre_call_check",
            "enable_pre_call_checks", "optional_pre_call_checks", "fallbacks",
            "content_policy_fallbacks", "context_window_fallbacks", "default_fallbacks",
            "max_fallbacks", "enable_tag_filtering", "tag_filtering_match_any",
            "cooldown_time", "disable_cooldowns", "retry_policy", "model_group_retry_policy",
            "allowed_fails", "allowed_fails_policy", "num_retries", "retry_after",
            "default_max_parallel_requests", "default_priority", "polling_interval",
            "default_litellm_params", "timeout", "stream_timeout", "debug_level",
            "set_verbose", "client_ttl", "cache_kwargs", "cache_responses",
            "caching_groups", "model_group_alias", "alerting_config", "assistants_config",
            "provider_budget_config", "router_general_settings",
            "deployment_affinity_ttl_seconds", "ignore_invalid_deployments", "search_tools",
            "guardrail_list",
        }
    ),
    # Entries of litellm_settings.default_team_settings: LiteLLM's team fields and the
    # per-team logging settings LiteLLM also reads from there.
    "default_team_settings[]": frozenset(
        {
            "organization_id", "members_with_roles", "metadata", "tags", "blocked",
            "model_aliases", "guardrails", "model_rpm_limit", "model_tpm_limit",
            "team_member_permissions", "team_member_key_duration", "object_permission",
            "prompts", "allowed_passthrough_routes", "max_parallel_requests",
            "success_callback", "failure_callback", "callback_vars", "langfuse_public_key",
            "langfuse_secret", "langfuse_secret_key", "langfuse_host",
        }
    ),
    # Pricing keys of model_list entries that budgetd does not price by. Any other
    # litellm_params/model_info key is passed through to providers by LiteLLM and is
    # accepted, except one that looks like a misspelled input/output_cost_per_token.
    "cost_keys": frozenset(
        {
            "input_cost_per_second", "output_cost_per_second", "input_cost_per_character",
            "output_cost_per_character", "input_cost_per_pixel", "output_cost_per_pixel",
            "input_cost_per_image", "output_cost_per_image", "input_cost_per_query",
            "input_cost_per_audio_token", "output_cost_per_audio_token",
            "input_cost_per_audio_per_second", "input_cost_per_video_per_second",
            "output_cost_per_reasoning_token", "input_cost_per_token_batches",
            "output_cost_per_token_batches", "input_cost_per_token_above_128k_tokens",
            "output_cost_per_token_above_128k_tokens",
            "input_cost_per_token_above_200k_tokens",
            "output_cost_per_token_above_200k_tokens", "cache_creation_input_token_cost",
            "cache_creation_input_token_cost_above_1hr", "cache_read_input_token_cost",
            "cache_read_input_token_cost_above_200k_tokens", "citation_cost_per_token",
            "search_context_cost_per_query", "input_cost_per_request",
            "input_cost_per_image_token", "output_cost_per_image_token",
            "cache_read_input_audio_token_cost", "cache_creation_input_audio_token_cost",
        }
    ),
}  # fmt: skip


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
