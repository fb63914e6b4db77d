"""budgetd's configuration: one YAML file in LiteLLM's shape, environment variables, overrides.

Precedence, highest first: command-line overrides, environment variables, the config file,
defaults. Everything is checked at start; whatever is wrong (unknown key, wrong type,
impossible value, unset ``os.environ/NAME``) stops the start with one :class:`ConfigError`
that lists every problem, one per line, as ``WHERE: KEY: what is wrong``, where WHERE is the
file, ``environment`` or ``command line`` and KEY is a dotted path such as
``budgetd.enforcement`` or ``litellm_settings.default_team_settings[0].budget_duration``.

Environment variables (``load_settings`` reads only the mapping it is given):

* ``BUDGETD_CONFIG`` (the file, when no path is passed), ``DATABASE_URL``, ``REDIS_URL``,
  ``BUDGETD_DATA_DIR``, ``BUDGETD_MASTER_KEY``, ``LITELLM_MASTER_KEY``,
  ``EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING``, ``JWT_PUBLIC_KEY_URL``, ``JWT_AUDIENCE``,
  ``JWT_ISSUER`` (the last two win over ``budgetd.jwt_audience`` / ``budgetd.jwt_issuer``);
* ``BUDGETD_<NAME>`` for the other ``budgetd:`` keys: ``BUDGETD_GRPC_ADDR``,
  ``BUDGETD_METRICS_ADDR``, ``BUDGETD_BRIDGE_LISTEN``, ``BUDGETD_BRIDGE_TARGET``,
  ``BUDGETD_REDIS_CLUSTER``, ``BUDGETD_ENFORCEMENT``, ``BUDGETD_RESERVATION_TTL``,
  ``BUDGETD_TIMEZONE``, ``BUDGETD_LOG_LEVEL``, ``BUDGETD_METRICS``, ``BUDGETD_REDIS_DOWN``,
  ``BUDGETD_POSTGRES_DOWN``, ``BUDGETD_SPOOL_DIR``, ``BUDGETD_RECORD_CACHE_TTL``.

An empty variable counts as unset. As in LiteLLM, the file's ``environment_variables:``
section provides variables too, below the real environment; they are what ``os.environ/NAME``
and the variables above see. ``os.environ/NAME`` is replaced wherever it appears in a string
value; an unset NAME is an error in every key budgetd reads, and is left as is in the LiteLLM
keys budgetd ignores (a provider's ``api_key``, for instance).

This module resolves; the pieces it builds on are :mod:`server.settings` (the resolved
dataclasses, re-exported here), :mod:`server.config_scalars` (which override, environment
variables and file keys set each scalar setting), :mod:`server.config_yaml` (reading the file)
and :mod:`server.config_problems` (a key's dotted path, pydantic's errors in budgetd's words).
The file's shape is :mod:`server.config_model`'s and the checks of each value are
:mod:`server.config_values`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Final, TypeVar, cast

from pydantic import BaseModel, ValidationError

from server.config_model import BudgetdSection, FileConfig, JwtAuthSection, ModelEntry, type_at
from server.config_problems import dotted, explain
from server.config_scalars import SCALARS, Scalar, unknown_override
from server.config_values import describe, parse_http_urls, parse_text
from server.config_yaml import read_yaml
from server.errors import ConfigError
from server.jwt_types import DEFAULT_ALGORITHMS as DEFAULT_JWT_ALGORITHMS
from server.jwt_types import HMAC_KEY_BYTES
from server.settings import DefaultTeamSettings, JwtSettings, ModelPrice, Settings

__all__ = [
    "ConfigError",
    "DefaultTeamSettings",
    "JwtSettings",
    "ModelPrice",
    "Settings",
    "dotted",
    "load_settings",
]

ENV_CONFIG: Final = "BUDGETD_CONFIG"
ENVIRONMENT: Final = "environment"
COMMAND_LINE: Final = "command line"
# Above this many values the file is rejected (YAML aliases can expand exponentially).
_MAX_VALUES = 200_000
_ENV_REF = re.compile(r"os\.environ/([A-Za-z_][A-Za-z0-9_]*)")

T = TypeVar("T")


def load_settings(
    config_path: str | Path | None,
    env: Mapping[str, str],
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load, check and resolve budgetd's configuration.

    ``config_path`` None means ``env["BUDGETD_CONFIG"]`` if set, else no file (defaults).
    ``env`` is the only environment read. ``overrides`` maps Settings field names to values
    (from command-line flags); None values are ignored. Raises :class:`ConfigError` naming
    the file (or environment variable, or override) and the key of every problem found.
    """
    if config_path is None and env.get(ENV_CONFIG):
        config_path = env[ENV_CONFIG]
    path = None if config_path is None else Path(config_path)
    resolver = _Resolver(path, env, {k: v for k, v in (overrides or {}).items() if v is not None})
    return resolver.settings()


# --------------------------------------------------------------------------------------------
# Resolving
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Origin:
    where: str
    key: str


class _Resolver:
    """One load: collects every problem, then builds Settings or raises one ConfigError."""

    def __init__(self, path: Path | None, env: Mapping[str, str], overrides: Mapping[str, object]):
        self.path = path
        self.env = env
        self.overrides = overrides
        self.problems: list[str] = []
        self.reported: set[tuple[str, str]] = set()
        self.file_env: dict[str, str] = {}
        self.file = FileConfig()
        self.origins: dict[str, _Origin] = {}

    # -- problems ----------------------------------------------------------------------------

    def problem(self, origin: _Origin, message: str) -> None:
        if (origin.where, origin.key) not in self.reported:
            self.reported.add((origin.where, origin.key))
            self.problems.append(f"{origin.where}: {origin.key}: {message}")

    def in_file(self, loc: tuple[object, ...]) -> _Origin:
        return _Origin(str(self.path), dotted(loc))

    # -- the whole load ----------------------------------------------------------------------

    def settings(self) -> Settings:
        if self.path is not None:
            self.load_file(self.path)
        for name in self.overrides:
            if name not in SCALARS:
                self.problem(_Origin(COMMAND_LINE, name), unknown_override(name))
        scalars = {name: self.scalar(name, spec) for name, spec in SCALARS.items()}
        built = Settings(
            grpc_addr=scalars["grpc_addr"],
            metrics_addr=scalars["metrics_addr"],
            bridge_listen=scalars["bridge_listen"],
            bridge_target=scalars["bridge_target"],
            database_url=scalars["database_url"],
            redis_url=scalars["redis_url"],
            redis_cluster=scalars["redis_cluster"],
            data_dir=scalars["data_dir"],
            master_key=scalars["master_key"],
            enforcement=scalars["enforcement"],
            reservation_ttl=scalars["reservation_ttl"],
            timezone=scalars["timezone"],
            log_level=scalars["log_level"],
            deny_status=scalars["deny_status"],
            incomplete_response=scalars["incomplete_response"],
            max_body_bytes=scalars["max_body_bytes"],
            redis_down=scalars["redis_down"],
            postgres_down=scalars["postgres_down"],
            spool_dir=scalars["spool_dir"],
            record_cache_ttl=scalars["record_cache_ttl"],
            lease_seconds=scalars["lease_seconds"],
            prices=self.prices(),
            default_team_settings=self.default_teams(),
            jwt=self.jwt(),
            success_callback=self.callbacks("success_callback"),
            failure_callback=self.callbacks("failure_callback"),
            metrics_enabled=scalars["metrics_enabled"],
            multi_instance_rate_limiting=scalars["multi_instance_rate_limiting"],
            config_path=self.path,
        )
        built = self.check_redis(built)
        if self.problems:
            raise ConfigError("\n".join(self.problems))
        return built

    def load_file(self, path: Path) -> None:
        raw = read_yaml(path)
        if "include" in raw:
            self.problem(
                self.in_file(("include",)),
                "is not supported by budgetd: merge the included files into this one",
            )
            raw = {key: value for key, value in raw.items() if key != "include"}
        self.file_env = self.file_environment(raw.get("environment_variables"))
        visible = {**self.file_env, **self.env}
        counter = iter(range(_MAX_VALUES))
        data = {
            key: value
            if key == "environment_variables"
            else self.substitute(value, (key,), visible, counter)
            for key, value in raw.items()
        }
        try:
            self.file = FileConfig.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                loc, message = explain(error)
                self.problem(self.in_file(loc), message)

    def file_environment(self, section: object) -> dict[str, str]:
        """The file's environment_variables (os.environ/NAME in them read the real env)."""
        found: dict[str, str] = {}
        if not isinstance(section, Mapping):
            return found  # a wrong type is reported by the model
        counter = iter(range(_MAX_VALUES))
        for name, value in section.items():
            loc = ("environment_variables", name)
            if not isinstance(name, str):
                continue
            if isinstance(value, bool):
                found[name] = "true" if value else "false"
            elif isinstance(value, int | float | str):
                found[name] = str(self.substitute(str(value), loc, self.env, counter))
            else:
                self.problem(
                    self.in_file(loc),
                    f"must be a string, number or boolean (got {describe(value)})",
                )
        return found

    def substitute(
        self, node: object, loc: tuple[object, ...], env: Mapping[str, str], counter: Iterator[int]
    ) -> object:
        """Replace os.environ/NAME in every string value under ``node``."""
        if next(counter, None) is None:
            raise ConfigError(f"{self.path}: has more than {_MAX_VALUES} values")
        if isinstance(node, dict):
            return {k: self.substitute(v, (*loc, k), env, counter) for k, v in node.items()}
        if isinstance(node, list):
            return [self.substitute(v, (*loc, i), env, counter) for i, v in enumerate(node)]
        if not isinstance(node, str) or "os.environ/" not in node:
            return node
        names = _ENV_REF.findall(node)
        missing = [name for name in names if name not in env]
        used = loc[0] == "environment_variables" or type_at(loc) is not None
        if used and len(names) != node.count("os.environ/"):
            self.problem(
                self.in_file(loc), "os.environ/ must be followed by an environment variable name"
            )
        elif used and missing:
            self.problem(
                self.in_file(loc),
                f"os.environ/{missing[0]}: the environment variable {missing[0]} is not set",
            )
        if missing:
            return node
        return _ENV_REF.sub(lambda match: env[match.group(1)], node)

    # -- scalar settings: override > environment > file > default ----------------------------

    def env_value(self, name: str) -> tuple[str, _Origin] | None:
        if self.env.get(name):
            return self.env[name], _Origin(ENVIRONMENT, name)
        if self.file_env.get(name):
            return self.file_env[name], self.in_file(("environment_variables", name))
        return None

    def scalar(self, name: str, spec: Scalar[T]) -> T:
        candidates: list[tuple[object, _Origin]] = []
        if name in self.overrides:
            candidates.append((self.overrides[name], _Origin(COMMAND_LINE, name)))
        for var in spec.env:
            found = self.env_value(var)
            if found is not None:
                candidates.append(found)
        if candidates:
            raw, origin = candidates[0]
            self.origins[name] = origin
            try:
                return spec.parse(raw)
            except ValueError as exc:
                self.problem(origin, str(exc))
                return spec.default
        for loc in spec.file:
            value = _attribute(self.file, loc)
            if value is not None:
                self.origins[name] = self.in_file(loc)
                return cast(T, value)  # checked by the model
        return spec.default

    def env_setting(self, name: str, parse: Callable[[object], str]) -> str | None:
        found = self.env_value(name)
        if found is None:
            return None
        try:
            return parse(found[0])
        except ValueError as exc:
            self.problem(found[1], str(exc))
            return None

    # -- structured settings -----------------------------------------------------------------

    def prices(self) -> Mapping[str, ModelPrice]:
        explicit = (self.file.budgetd.prices if self.file.budgetd else None) or {}
        prices: dict[str, ModelPrice] = {}
        first: dict[str, int] = {}
        for index, entry in enumerate(self.file.model_list or ()):
            price = _entry_price(entry)
            name = entry.model_name
            if price is None or name in explicit:
                continue
            if name in prices and prices[name] != price:
                self.problem(
                    self.in_file(("model_list", index)),
                    f"model {name!r} is priced differently in model_list[{first[name]}]; "
                    f"set budgetd.prices.{name} to choose one price",
                )
            elif name not in prices:
                prices[name], first[name] = price, index
        for name, given in explicit.items():
            prices[name] = ModelPrice(given.input_cost_per_token, given.output_cost_per_token)
        return MappingProxyType(prices)

    def default_teams(self) -> tuple[DefaultTeamSettings, ...]:
        section = self.file.litellm_settings
        entries = (section.default_team_settings if section else None) or ()
        teams: list[DefaultTeamSettings] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(entries):
            if entry.team_id in seen:
                self.problem(
                    self.in_file(("litellm_settings", "default_team_settings", index, "team_id")),
                    f"{entry.team_id!r} is already in default_team_settings[{seen[entry.team_id]}]",
                )
                continue
            seen[entry.team_id] = index
            teams.append(
                DefaultTeamSettings(
                    team_id=entry.team_id,
                    team_alias=entry.team_alias,
                    max_budget=entry.max_budget,
                    budget_duration=entry.budget_duration,
                    tpm_limit=entry.tpm_limit,
                    rpm_limit=entry.rpm_limit,
                    models=entry.models or (),
                    team_member_budget=entry.team_member_budget,
                    team_member_budget_duration=entry.team_member_budget_duration,
                    team_member_rpm_limit=entry.team_member_rpm_limit,
                    team_member_tpm_limit=entry.team_member_tpm_limit,
                )
            )
        return tuple(teams)

    def callbacks(self, name: str) -> tuple[str, ...]:
        section = self.file.litellm_settings
        value = getattr(section, name) if section else None
        return tuple(value or ())

    def jwt(self) -> JwtSettings:
        general = self.file.general_settings
        top, nested = self.file.litellm_jwtauth, general.litellm_jwtauth if general else None
        if top is not None and nested is not None:
            self.problem(
                self.in_file(("litellm_jwtauth",)),
                "is also set in general_settings.litellm_jwtauth; keep one of them",
            )
        section = top or nested or JwtAuthSection()
        where = ("litellm_jwtauth",) if top else ("general_settings", "litellm_jwtauth")
        if section.team_id_upsert and not section.team_id_jwt_field:
            self.problem(
                self.in_file((*where, "team_id_upsert")),
                "needs team_id_jwt_field, the JWT claim that names the team",
            )
        defaults = JwtSettings()
        own = self.file.budgetd or BudgetdSection()
        jwt = JwtSettings(
            enabled=bool(general and general.enable_jwt_auth),
            team_id_upsert=bool(section.team_id_upsert),
            team_id_jwt_field=section.team_id_jwt_field,
            team_ids_jwt_field=section.team_ids_jwt_field,
            team_id_default=section.team_id_default,
            org_id_jwt_field=section.org_id_jwt_field,
            user_id_jwt_field=section.user_id_jwt_field,
            user_id_upsert=bool(section.user_id_upsert),
            user_email_jwt_field=section.user_email_jwt_field,
            user_allowed_email_domain=section.user_allowed_email_domain,
            end_user_id_jwt_field=section.end_user_id_jwt_field,
            admin_jwt_scope=section.admin_jwt_scope or defaults.admin_jwt_scope,
            public_key_ttl=section.public_key_ttl or defaults.public_key_ttl,
            public_key_url=self.env_setting("JWT_PUBLIC_KEY_URL", parse_http_urls),
            audience=self.env_setting("JWT_AUDIENCE", parse_text) or own.jwt_audience,
            issuer=self.env_setting("JWT_ISSUER", parse_text) or own.jwt_issuer,
            public_key_pem=own.jwt_public_key,
            algorithms=self.jwt_algorithms(own),
            hmac_secret=own.jwt_hmac_secret,
            leeway=defaults.leeway if own.jwt_leeway is None else own.jwt_leeway,
        )
        self.check_jwt_keys(jwt, bool(general and general.enable_jwt_auth))
        return jwt

    def jwt_algorithms(self, own: BudgetdSection) -> tuple[str, ...]:
        """budgetd.jwt_algorithms, or the default list (with HS* when a secret is set)."""
        secret = own.jwt_hmac_secret
        size = len(secret.encode()) if secret is not None else 0
        if own.jwt_algorithms is None:
            hmac = tuple(name for name, least in HMAC_KEY_BYTES.items() if secret and size >= least)
            return (*DEFAULT_JWT_ALGORITHMS, *hmac)
        where = self.in_file(("budgetd", "jwt_algorithms"))
        hmac = tuple(name for name in own.jwt_algorithms if name in HMAC_KEY_BYTES)
        if hmac and secret is None:
            self.problem(
                where,
                f"lists {hmac[0]}, which needs budgetd.jwt_hmac_secret: HS algorithms are "
                "verified only with a configured shared secret",
            )
        elif secret is not None and not hmac:
            self.problem(
                self.in_file(("budgetd", "jwt_hmac_secret")),
                "is set, but budgetd.jwt_algorithms lists none of HS256, HS384, HS512",
            )
        for name in hmac:
            if secret is not None and size < HMAC_KEY_BYTES[name]:
                self.problem(
                    self.in_file(("budgetd", "jwt_hmac_secret")),
                    f"is {size} bytes long; {name} needs at least {HMAC_KEY_BYTES[name]} bytes "
                    "(RFC 7518 section 3.2)",
                )
        return own.jwt_algorithms

    def check_jwt_keys(self, jwt: JwtSettings, enabled: bool) -> None:
        """enable_jwt_auth needs a key source; a PEM key must fit an allowed algorithm."""
        if jwt.public_key_pem is not None:
            # Only a configured key loads cryptography (server.jwt_auth), not every start.
            from server.jwt_keys import describe_key, key_fits, load_public_key_pem  # noqa: PLC0415

            key = load_public_key_pem(jwt.public_key_pem)  # checked by the model
            if not any(key_fits(name, key) for name in jwt.algorithms):
                self.problem(
                    self.in_file(("budgetd", "jwt_public_key")),
                    f"is {describe_key(key)}, but no algorithm in budgetd.jwt_algorithms "
                    "can verify with it",
                )
        # An invalid JWT_PUBLIC_KEY_URL is reported as such, not as a missing key source.
        has_url = self.env_value("JWT_PUBLIC_KEY_URL") is not None
        if enabled and not (has_url or jwt.public_key_pem or jwt.hmac_secret):
            self.problem(
                self.in_file(("general_settings", "enable_jwt_auth")),
                "is true, but no key to verify JWTs with is configured: set JWT_PUBLIC_KEY_URL "
                "(JWKS URLs), budgetd.jwt_public_key (a PEM public key) or "
                "budgetd.jwt_hmac_secret",
            )

    def check_redis(self, settings: Settings) -> Settings:
        """Cross-checks of the Redis settings; a cluster URL implies redis_cluster."""
        url = settings.redis_url
        scheme = url.split("://", 1)[0].lower() if url else ""
        cluster_origin = self.origins.get("redis_cluster")
        if scheme.endswith("+cluster"):
            if cluster_origin is not None and not settings.redis_cluster:
                self.problem(cluster_origin, "is false, but redis_url is a cluster URL")
            return replace(settings, redis_cluster=True)
        if settings.redis_cluster and cluster_origin is not None:
            if url is None:
                self.problem(
                    cluster_origin, "needs a Redis URL: set REDIS_URL or budgetd.redis_url"
                )
            elif scheme == "unix":
                self.problem(cluster_origin, "cannot be used with a unix:// Redis URL")
        limits_origin = self.origins.get("multi_instance_rate_limiting")
        if settings.multi_instance_rate_limiting and url is None and limits_origin is not None:
            self.problem(
                limits_origin,
                "needs Redis to share team-member limits between instances: "
                "set REDIS_URL or budgetd.redis_url",
            )
        return settings


def _attribute(model: BaseModel, loc: tuple[str, ...]) -> object:
    value: object = model
    for name in loc:
        value = getattr(value, name, None)
        if value is None:
            return None
    return value


def _entry_price(entry: ModelEntry) -> ModelPrice | None:
    sources = [part for part in (entry.litellm_params, entry.model_info) if part is not None]
    given_in = next(
        (p.input_cost_per_token for p in sources if p.input_cost_per_token is not None), None
    )
    given_out = next(
        (p.output_cost_per_token for p in sources if p.output_cost_per_token is not None), None
    )
    if given_in is None and given_out is None:
        return None
    zero = Decimal(0)
    return ModelPrice(
        zero if given_in is None else given_in, zero if given_out is None else given_out
    )
