"""The scalar settings: which override, environment variables and file keys set each one.

:data:`SCALARS` maps a :class:`~server.settings.Settings` field name to its :class:`Scalar`:
how a raw value is parsed, the default, the environment variables (first set wins) and the
file keys (first present wins). These are also the settings a command-line override may set;
:func:`unknown_override` explains an override that is not one of them. The precedence itself
(override, then environment, then file, then default) is applied by :mod:`server.config`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from server.config_values import (
    parse_address,
    parse_body_bytes,
    parse_bool,
    parse_cache_ttl,
    parse_deny_status,
    parse_enforcement,
    parse_incomplete_response,
    parse_log_level,
    parse_path,
    parse_postgres_down,
    parse_postgres_url,
    parse_redis_down,
    parse_redis_url,
    parse_seconds,
    parse_secret,
    parse_timezone,
)
from server.settings import Settings

__all__ = ["SCALARS", "Scalar", "unknown_override"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Scalar(Generic[T]):
    """A setting taken from an override, else environment variables, else file keys."""

    parse: Callable[[object], T]
    default: T
    env: tuple[str, ...] = ()
    file: tuple[tuple[str, ...], ...] = ()


_DEFAULT: Final = Settings()


def _budgetd(key: str, parse: Callable[[object], T], default: T) -> Scalar[T]:
    return Scalar(parse, default, (f"BUDGETD_{key.upper()}",), (("budgetd", key),))


# The settings a command-line override may set, by Settings field name.
SCALARS: Final[Mapping[str, Scalar[Any]]] = {
    "grpc_addr": _budgetd("grpc_addr", parse_address, _DEFAULT.grpc_addr),
    "metrics_addr": _budgetd("metrics_addr", parse_address, _DEFAULT.metrics_addr),
    "bridge_listen": _budgetd("bridge_listen", parse_address, _DEFAULT.bridge_listen),
    "bridge_target": _budgetd("bridge_target", parse_address, _DEFAULT.bridge_target),
    "database_url": Scalar(
        parse_postgres_url,
        None,
        ("DATABASE_URL",),
        (("budgetd", "database_url"), ("general_settings", "database_url")),
    ),
    "redis_url": Scalar(parse_redis_url, None, ("REDIS_URL",), (("budgetd", "redis_url"),)),
    "redis_cluster": _budgetd("redis_cluster", parse_bool, False),
    "data_dir": _budgetd("data_dir", parse_path, _DEFAULT.data_dir),
    "master_key": Scalar(
        parse_secret,
        None,
        ("BUDGETD_MASTER_KEY", "LITELLM_MASTER_KEY"),
        (("general_settings", "master_key"),),
    ),
    "enforcement": _budgetd("enforcement", parse_enforcement, _DEFAULT.enforcement),
    "reservation_ttl": _budgetd("reservation_ttl", parse_seconds, _DEFAULT.reservation_ttl),
    "timezone": _budgetd("timezone", parse_timezone, _DEFAULT.timezone),
    "log_level": _budgetd("log_level", parse_log_level, _DEFAULT.log_level),
    "deny_status": _budgetd("deny_status", parse_deny_status, _DEFAULT.deny_status),
    "incomplete_response": _budgetd(
        "incomplete_response", parse_incomplete_response, _DEFAULT.incomplete_response
    ),
    "max_body_bytes": _budgetd("max_body_bytes", parse_body_bytes, _DEFAULT.max_body_bytes),
    "redis_down": _budgetd("redis_down", parse_redis_down, _DEFAULT.redis_down),
    "postgres_down": _budgetd("postgres_down", parse_postgres_down, _DEFAULT.postgres_down),
    "spool_dir": _budgetd("spool_dir", parse_path, _DEFAULT.spool_dir),
    "record_cache_ttl": _budgetd("record_cache_ttl", parse_cache_ttl, _DEFAULT.record_cache_ttl),
    "lease_seconds": _budgetd("lease_seconds", parse_cache_ttl, _DEFAULT.lease_seconds),
    "metrics_enabled": Scalar(parse_bool, True, ("BUDGETD_METRICS",), (("budgetd", "metrics"),)),
    "multi_instance_rate_limiting": Scalar(
        parse_bool, False, ("EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING",)
    ),
}


def unknown_override(name: str) -> str:
    """Why an override ``name`` is refused (with a "did you mean" hint when one is close)."""
    if name in Settings.__dataclass_fields__:
        return "cannot be set from the command line; set it in the config file"
    hint = difflib.get_close_matches(name, sorted(SCALARS), n=1, cutoff=0.75)
    return "unknown setting" + (f" (did you mean {hint[0]!r}?)" if hint else "")
