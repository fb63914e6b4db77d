"""budgetd's configuration: the file, environment variables, overrides, and what stops a start."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from server.config import (
    DefaultTeamSettings,
    JwtSettings,
    ModelPrice,
    Settings,
    load_settings,
)
from server.errors import ConfigError
from server.jwt_types import DEFAULT_ALGORITHMS, HMAC_ALGORITHMS
from server.rules import Enforcement

FIXTURES = Path(__file__).parent / "fixtures" / "config"
VALID = ("empty.yaml", "seed_litellm.yaml", "full.yaml", "litellm_proxy.yaml")

# fixture -> (dotted key, a fragment of the message)
ERRORS: dict[str, tuple[str, str]] = {
    "bad_unknown_top_level.yaml": (
        "litelm_settings",
        "unknown key (did you mean 'litellm_settings'?)",
    ),
    "bad_budgetd_misspelled_key.yaml": (
        "budgetd.enforcment",
        "unknown key (did you mean 'enforcement'?)",
    ),
    "bad_wrong_type_bool.yaml": ("budgetd.metrics", "must be true or false (got 1)"),
    "bad_wrong_type_list.yaml": (
        "litellm_settings.success_callback",
        "must be a list (got 'prometheus')",
    ),
    "bad_wrong_type_section.yaml": ("budgetd", "must be a mapping (got a list)"),
    "bad_wrong_type_address.yaml": ("budgetd.grpc_addr", "(got 50051)"),
    "bad_negative_reservation_ttl.yaml": (
        "budgetd.reservation_ttl",
        "must be more than 0 seconds (got -5)",
    ),
    "bad_reservation_ttl_too_long.yaml": ("budgetd.reservation_ttl", "at most 1 day"),
    "bad_enforcement.yaml": (
        "budgetd.enforcement",
        "must be one of cross_once, never_exceed (got 'sometimes')",
    ),
    "bad_deny_status.yaml": ("budgetd.deny_status", "from 400 to 499 (got 600)"),
    "bad_incomplete_response.yaml": (
        "budgetd.incomplete_response",
        "must be one of release, estimate (got 'sometimes')",
    ),
    "bad_max_body_bytes.yaml": ("budgetd.max_body_bytes", "from 1024 to 67108864 (got 12)"),
    "bad_redis_down.yaml": (
        "budgetd.redis_down",
        "must be one of postgres, deny (got 'sometimes')",
    ),
    "bad_postgres_down.yaml": ("budgetd.postgres_down", "must be one of spool, deny (got 'drop')"),
    "bad_spool_dir.yaml": ("budgetd.spool_dir", "must not be empty"),
    "bad_record_cache_ttl.yaml": (
        "budgetd.record_cache_ttl",
        "must be from 0 to 3600 seconds (got '2h')",
    ),
    "bad_budget_duration.yaml": (
        "litellm_settings.default_team_settings[0].budget_duration",
        "'1x' is not a duration",
    ),
    "bad_negative_max_budget.yaml": (
        "litellm_settings.default_team_settings[0].max_budget",
        "must not be negative (got -1)",
    ),
    "bad_unset_env_var.yaml": (
        "general_settings.master_key",
        "BUDGETD_TEST_UNSET_MASTER_KEY is not set",
    ),
    "bad_duplicate_key.yaml": ("", "duplicate key 'enforcement'"),
    "bad_address_without_port.yaml": ("budgetd.grpc_addr", "the port is missing (got 'localhost')"),
    "bad_address_port_range.yaml": ("budgetd.metrics_addr", "from 0 to 65535"),
    "bad_address_ipv6_brackets.yaml": ("budgetd.bridge_listen", "in brackets"),
    "bad_unknown_price_field.yaml": (
        "budgetd.prices.gpt-4o.input_cost_per_tokens",
        "unknown key (did you mean 'input_cost_per_token'?)",
    ),
    "bad_unknown_model_price_field.yaml": (
        "model_list[0].litellm_params.output_cost_per_tokens",
        "unknown key (did you mean 'output_cost_per_token'?)",
    ),
    "bad_negative_price.yaml": (
        "model_list[0].model_info.input_cost_per_token",
        "must not be negative",
    ),
    "bad_database_url.yaml": (
        "general_settings.database_url",
        "must be a URL starting with postgres:// or postgresql:// (got a mysql:// URL)",
    ),
    "bad_redis_url.yaml": ("budgetd.redis_url", "(got a http:// URL)"),
    "bad_timezone.yaml": ("budgetd.timezone", "is not a known time zone"),
    "bad_log_level.yaml": (
        "budgetd.log_level",
        "must be one of debug, info, warning, error (got 'verbose')",
    ),
    "bad_unknown_general_setting.yaml": (
        "general_settings.master_kye",
        "did you mean 'master_key'?",
    ),
    "bad_unknown_litellm_setting.yaml": (
        "litellm_settings.default_team_setting",
        "did you mean 'default_team_settings'?",
    ),
    "bad_unknown_jwt_field.yaml": (
        "litellm_jwtauth.team_id_jwt_feild",
        "did you mean 'team_id_jwt_field'?",
    ),
    "bad_unknown_team_field.yaml": (
        "litellm_settings.default_team_settings[0].max_budgett",
        "did you mean 'max_budget'?",
    ),
    "bad_missing_model_name.yaml": ("model_list[0].model_name", "is required"),
    "bad_conflicting_prices.yaml": ("model_list[1]", "priced differently in model_list[0]"),
    "bad_jwtauth_twice.yaml": ("litellm_jwtauth", "also set in general_settings.litellm_jwtauth"),
    "bad_upsert_without_team_field.yaml": (
        "litellm_jwtauth.team_id_upsert",
        "needs team_id_jwt_field",
    ),
    "bad_duplicate_default_team.yaml": (
        "litellm_settings.default_team_settings[1].team_id",
        "already in default_team_settings[0]",
    ),
    "bad_include.yaml": ("include", "not supported"),
    "bad_environment_variables.yaml": (
        "environment_variables.SOME_LIST",
        "must be a string, number or boolean (got a list)",
    ),
    "bad_redis_cluster_without_url.yaml": ("budgetd.redis_cluster", "needs a Redis URL"),
    "bad_invalid_yaml.yaml": ("", "invalid YAML"),
    "bad_not_a_mapping.yaml": ("", "the top level must be a mapping"),
    "bad_multiple_errors.yaml": ("budgetd.enforcement", "must be one of"),
    "bad_jwt_algorithm_unknown.yaml": (
        "budgetd.jwt_algorithms",
        "'XS256' is not a JWT signature algorithm budgetd supports (use RS256, ",
    ),
    "bad_jwt_algorithm_none.yaml": (
        "budgetd.jwt_algorithms",
        "must not list 'none': budgetd never accepts unsigned JWTs",
    ),
    "bad_jwt_algorithms_empty.yaml": ("budgetd.jwt_algorithms", "must list at least one"),
    "bad_jwt_hs_without_secret.yaml": (
        "budgetd.jwt_algorithms",
        "lists HS256, which needs budgetd.jwt_hmac_secret",
    ),
    "bad_jwt_hmac_secret_short.yaml": (
        "budgetd.jwt_hmac_secret",
        "must be at least 32 bytes long (RFC 7518 section 3.2; got 9)",
    ),
    "bad_jwt_hmac_secret_short_for_hs512.yaml": (
        "budgetd.jwt_hmac_secret",
        "is 35 bytes long; HS512 needs at least 64 bytes",
    ),
    "bad_jwt_hmac_secret_unused.yaml": (
        "budgetd.jwt_hmac_secret",
        "is set, but budgetd.jwt_algorithms lists none of HS256, HS384, HS512",
    ),
    "bad_jwt_hmac_secret_pem.yaml": (
        "budgetd.jwt_hmac_secret",
        "is a PEM key, not a shared secret",
    ),
    "bad_jwt_public_key.yaml": (
        "budgetd.jwt_public_key",
        "is not a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate",
    ),
    "bad_jwt_public_key_fits_no_algorithm.yaml": (
        "budgetd.jwt_public_key",
        "is an EC P-256 key, but no algorithm in budgetd.jwt_algorithms can verify with it",
    ),
    "bad_jwt_leeway.yaml": ("budgetd.jwt_leeway", "must be from 0 to 300 seconds (got 301)"),
    "bad_jwt_without_key_source.yaml": (
        "general_settings.enable_jwt_auth",
        "is true, but no key to verify JWTs with is configured: set JWT_PUBLIC_KEY_URL",
    ),
    "bad_jwt_issuer_empty.yaml": ("budgetd.jwt_issuer", "must not be empty"),
}


def fixture(name: str) -> Path:
    return FIXTURES / name


def config_error(
    path: Path | str | None, env: dict[str, str] | None = None, **overrides: object
) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env or {}, overrides)
    return str(caught.value)


# -- the fixtures ---------------------------------------------------------------------------


def test_every_fixture_is_used() -> None:
    on_disk = {path.name for path in FIXTURES.glob("*.yaml")}
    assert on_disk == set(VALID) | set(ERRORS)


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_error_fixture_stops_loading_naming_file_and_key(name: str) -> None:
    key, fragment = ERRORS[name]
    message = config_error(fixture(name))
    path = str(fixture(name))
    assert path in message
    assert fragment in message
    if key:
        assert f"{path}: {key}: " in message
    # Every line is one problem in budgetd's words, never a pydantic dump.
    for line in message.splitlines():
        assert line.startswith(f"{path}: ")
    for leak in ("pydantic", "Input should", "validation error", "Traceback", "Value error"):
        assert leak not in message


def test_multiple_errors_are_reported_together_one_per_line() -> None:
    path = fixture("bad_multiple_errors.yaml")
    lines = config_error(path).splitlines()
    keys = [line.removeprefix(f"{path}: ").split(": ")[0] for line in lines]
    assert sorted(keys) == sorted(
        [
            "budgetd.enforcement",
            "budgetd.reservation_ttl",
            "budgetd.grpc_addr",
            "litellm_settings.default_team_settings[0].budget_duration",
            "general_settings.master_kye",
        ]
    )


def test_invalid_yaml_names_the_line() -> None:
    message = config_error(fixture("bad_invalid_yaml.yaml"))
    assert "line " in message
    assert "column " in message


def test_duplicate_key_names_the_line() -> None:
    assert "line 3" in config_error(fixture("bad_duplicate_key.yaml"))


def test_bad_database_url_does_not_echo_the_password() -> None:
    assert "hunter2" not in config_error(fixture("bad_database_url.yaml"))


def test_empty_file_gives_the_defaults() -> None:
    path = fixture("empty.yaml")
    assert load_settings(path, {}) == dataclasses.replace(Settings(), config_path=path)


def test_no_file_gives_the_defaults() -> None:
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.grpc_addr == "127.0.0.1:50051"
    assert settings.metrics_addr == "127.0.0.1:9464"
    assert settings.bridge_listen == "127.0.0.1:4000"
    assert settings.bridge_target == "127.0.0.1:50051"
    assert settings.database_url is None
    assert settings.redis_url is None
    assert settings.redis_cluster is False
    assert settings.data_dir == Path("./.budgetd")
    assert settings.master_key is None
    assert settings.enforcement is Enforcement.CROSS_ONCE
    assert settings.reservation_ttl == 600.0
    assert settings.timezone == "UTC"
    assert settings.tzinfo is dt.UTC
    assert settings.log_level == "info"
    assert dict(settings.prices) == {}
    assert settings.default_team_settings == ()
    assert settings.jwt == JwtSettings()
    assert settings.success_callback == ()
    assert settings.failure_callback == ()
    assert settings.metrics_enabled is True
    assert settings.multi_instance_rate_limiting is False
    assert settings.redis_down == "postgres"
    assert settings.postgres_down == "spool"
    assert settings.spool_dir is None
    assert settings.spool_path == Path(".budgetd/spool")
    assert settings.record_cache_ttl == 5.0
    assert settings.config_path is None


def test_seed_config_loads() -> None:
    settings = load_settings(fixture("seed_litellm.yaml"), {})
    assert settings.master_key == "sk-1234"
    assert settings.jwt.team_id_upsert is True
    assert settings.jwt.team_id_jwt_field == "team_id"
    assert settings.default_team_settings == (
        DefaultTeamSettings(team_id="default-settings", max_budget=100.0),
    )
    assert settings.default_team_settings[0].duration is None
    assert settings.success_callback == ("prometheus",)
    assert settings.failure_callback == ("prometheus",)
    assert settings.metrics_enabled is True


FULL_ENV = {"FULL_TEST_MASTER_KEY": "sk-from-env-ref", "FULL_TEST_PG_PASSWORD": "s3cret"}
FULL_PEM = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEuyz+RV9Blb6HULOY1fZMfZJwwthq\n"
    "0On2t7Yqw2xXRLY2W6K+mYJfvLHHRK5TTktWV9UImqCRl/LLNdnFHJKbag==\n"
    "-----END PUBLIC KEY-----\n"
)


def test_full_config_loads_every_key() -> None:
    settings = load_settings(fixture("full.yaml"), FULL_ENV)
    assert settings.grpc_addr == "0.0.0.0:50052"
    assert settings.metrics_addr == "[::1]:9465"
    assert settings.bridge_listen == "127.0.0.1:4001"
    assert settings.bridge_target == "budgetd.internal:50052"
    # budgetd.database_url beats general_settings.database_url; os.environ/ inside a string.
    assert settings.database_url == "postgresql://budgetd:s3cret@db.internal:5432/budgetd"
    assert settings.redis_url == "rediss+cluster://redis.internal:6379"
    assert settings.redis_cluster is True
    assert settings.data_dir == Path("/var/lib/budgetd")
    assert settings.master_key == "sk-from-env-ref"
    assert settings.enforcement is Enforcement.NEVER_EXCEED
    assert settings.reservation_ttl == 90.0
    assert settings.timezone == "Europe/Paris"
    assert settings.tzinfo == ZoneInfo("Europe/Paris")
    assert settings.log_level == "debug"
    assert settings.metrics_enabled is False
    assert settings.deny_status == 403
    assert settings.incomplete_response == "estimate"
    assert settings.max_body_bytes == 2 * 1024 * 1024
    assert settings.redis_down == "deny"
    assert settings.postgres_down == "deny"
    assert settings.spool_path == settings.spool_dir == Path("/var/spool/budgetd")
    assert settings.record_cache_ttl == 2.0
    assert settings.lease_seconds == 0.5
    assert settings.success_callback == ("prometheus",)
    assert settings.failure_callback == ("prometheus",)
    assert settings.multi_instance_rate_limiting is False
    assert settings.config_path == fixture("full.yaml")


def test_full_config_prices_are_exact() -> None:
    prices = load_settings(fixture("full.yaml"), FULL_ENV).prices
    assert dict(prices) == {
        # budgetd.prices overrides model_list
        "gpt-4o": ModelPrice(Decimal("0.000005"), Decimal("0.000015")),
        "claude-3-haiku": ModelPrice(Decimal("0.00000025"), Decimal("0.00000125")),
        # from model_info
        "llama3": ModelPrice(Decimal("0.000001"), Decimal("0.000002")),
        # an embedding model: no output price
        "text-embedding-3-small": ModelPrice(Decimal("0.00000002"), Decimal(0)),
    }
    assert all(isinstance(p.input_cost_per_token, Decimal) for p in prices.values())
    assert "unpriced" not in prices
    with pytest.raises(TypeError):
        prices["x"] = ModelPrice(Decimal(0), Decimal(0))  # type: ignore[index]


def test_full_config_default_team_settings() -> None:
    teams = load_settings(fixture("full.yaml"), FULL_ENV).default_team_settings
    assert teams == (
        DefaultTeamSettings(
            team_id="default-settings",
            team_alias="Default",
            max_budget=100.0,
            budget_duration="30d",
            tpm_limit=100000,
            rpm_limit=600,
            models=("gpt-4o", "llama3"),
            team_member_budget=10.0,
            team_member_budget_duration="1d",
            team_member_rpm_limit=60,
            team_member_tpm_limit=10000,
        ),
        DefaultTeamSettings(team_id="qa", max_budget=1e-9, budget_duration="1d"),
    )
    assert teams[0].duration is not None and teams[0].duration.months == 1
    assert teams[0].team_member_duration is not None
    assert teams[0].team_member_duration.seconds == 86_400


def test_full_config_jwt() -> None:
    env = {
        **FULL_ENV,
        "JWT_PUBLIC_KEY_URL": "https://idp.example.com/jwks.json",
        "JWT_AUDIENCE": "budgetd",
        "JWT_ISSUER": "https://idp.example.com/",
    }
    jwt = load_settings(fixture("full.yaml"), env).jwt
    assert jwt == JwtSettings(
        enabled=True,
        team_id_upsert=True,
        team_id_jwt_field="team_id",
        team_ids_jwt_field="groups",
        team_id_default="fallback-team",
        org_id_jwt_field="org_id",
        user_id_jwt_field="sub",
        user_id_upsert=True,
        user_email_jwt_field="email",
        user_allowed_email_domain="example.com",
        end_user_id_jwt_field="customer_id",
        admin_jwt_scope="budgetd_admin",
        public_key_ttl=300.0,
        public_key_url="https://idp.example.com/jwks.json",
        audience="budgetd",
        issuer="https://idp.example.com/",
        public_key_pem=FULL_PEM,
        algorithms=("RS256", "ES256", "HS256"),
        hmac_secret="a-shared-secret-of-32-bytes-or-more",
        leeway=10.0,
    )
    # JWT_AUDIENCE and JWT_ISSUER win over budgetd.jwt_audience and budgetd.jwt_issuer.
    jwt = load_settings(fixture("full.yaml"), FULL_ENV).jwt
    assert (jwt.audience, jwt.issuer) == ("budgetd-from-file", "https://file.example.com/")


def test_litellm_proxy_config_loads_with_provider_keys_unset() -> None:
    env = {
        "LITELLM_MASTER_KEY": "sk-litellm",
        "DATABASE_URL": "postgresql://db/litellm",
        # enable_jwt_auth: true needs a key source.
        "JWT_PUBLIC_KEY_URL": "https://idp.example.com/jwks.json",
    }
    settings = load_settings(fixture("litellm_proxy.yaml"), env)
    assert settings.master_key == "sk-litellm"
    assert settings.database_url == "postgresql://db/litellm"
    assert settings.jwt.enabled is True
    assert settings.jwt.team_id_jwt_field == "client_id"
    assert settings.success_callback == ("langfuse", "prometheus")
    assert dict(settings.prices) == {}


def test_unset_reference_in_a_key_budgetd_reads_is_an_error_there_too() -> None:
    # litellm_proxy.yaml's general_settings.master_key is os.environ/LITELLM_MASTER_KEY.
    message = config_error(fixture("litellm_proxy.yaml"))
    path = fixture("litellm_proxy.yaml")
    assert f"{path}: general_settings.master_key: os.environ/LITELLM_MASTER_KEY" in message
    assert f"{path}: general_settings.database_url: os.environ/DATABASE_URL" in message
    assert "AZURE_API_KEY" not in message


# -- where the file comes from --------------------------------------------------------------


def test_budgetd_config_env_names_the_file() -> None:
    path = str(fixture("seed_litellm.yaml"))
    assert load_settings(None, {"BUDGETD_CONFIG": path}).master_key == "sk-1234"


def test_explicit_path_beats_budgetd_config() -> None:
    env = {"BUDGETD_CONFIG": str(fixture("seed_litellm.yaml"))}
    assert load_settings(fixture("empty.yaml"), env).master_key is None


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert config_error(missing) == f"{missing}: config file not found"
    assert str(missing) in config_error(None, {"BUDGETD_CONFIG": str(missing)})


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    assert "is a directory" in config_error(tmp_path)


# -- precedence: override > environment > file > default --------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_precedence_of_a_budgetd_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  grpc_addr: 10.0.0.1:1111\n")
    env = {"BUDGETD_GRPC_ADDR": "10.0.0.2:2222"}
    assert load_settings(None, {}).grpc_addr == "127.0.0.1:50051"
    assert load_settings(path, {}).grpc_addr == "10.0.0.1:1111"
    assert load_settings(path, env).grpc_addr == "10.0.0.2:2222"
    assert load_settings(path, env, {"grpc_addr": "10.0.0.3:3333"}).grpc_addr == "10.0.0.3:3333"
    assert load_settings(path, env, {"grpc_addr": None}).grpc_addr == "10.0.0.2:2222"


def test_precedence_of_every_overridable_setting(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "budgetd:\n  enforcement: never_exceed\n  reservation_ttl: 10m\n  log_level: error\n",
    )
    env = {"BUDGETD_RESERVATION_TTL": "30", "BUDGETD_LOG_LEVEL": "WARNING"}
    overrides: dict[str, object] = {
        "metrics_addr": "0.0.0.0:9000",
        "bridge_listen": "0.0.0.0:4444",
        "bridge_target": "[::1]:50051",
        "log_level": "debug",
        "data_dir": Path("/tmp/x"),
        "redis_url": "redis://localhost:6379/0",
    }
    settings = load_settings(path, env, overrides)
    assert settings.enforcement is Enforcement.NEVER_EXCEED
    assert settings.reservation_ttl == 30.0
    assert settings.log_level == "debug"
    assert settings.metrics_addr == "0.0.0.0:9000"
    assert settings.bridge_listen == "0.0.0.0:4444"
    assert settings.bridge_target == "[::1]:50051"
    assert settings.data_dir == Path("/tmp/x")
    assert settings.redis_url == "redis://localhost:6379/0"
    assert load_settings(path, env).log_level == "warning"


def test_database_url_precedence(tmp_path: Path) -> None:
    both = write(
        tmp_path,
        "budgetd:\n  database_url: postgres://budgetd/b\n"
        "general_settings:\n  database_url: postgresql://general/g\n",
    )
    assert load_settings(both, {}).database_url == "postgres://budgetd/b"
    env = {"DATABASE_URL": "postgresql://env/e"}
    assert load_settings(both, env).database_url == "postgresql://env/e"
    general_only = tmp_path / "general.yaml"
    general_only.write_text("general_settings:\n  database_url: postgresql://general/g\n")
    assert load_settings(general_only, {}).database_url == "postgresql://general/g"


def test_master_key_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "general_settings:\n  master_key: sk-file\n")
    assert load_settings(path, {}).master_key == "sk-file"
    assert load_settings(path, {"LITELLM_MASTER_KEY": "sk-litellm"}).master_key == "sk-litellm"
    env = {"LITELLM_MASTER_KEY": "sk-litellm", "BUDGETD_MASTER_KEY": "sk-budgetd"}
    assert load_settings(path, env).master_key == "sk-budgetd"
    # An empty variable counts as unset.
    assert load_settings(path, {"BUDGETD_MASTER_KEY": ""}).master_key == "sk-file"


def test_data_dir_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  data_dir: /srv/budgetd\n")
    assert load_settings(path, {}).data_dir == Path("/srv/budgetd")
    assert load_settings(path, {"BUDGETD_DATA_DIR": "/data"}).data_dir == Path("/data")


def test_redis_url_from_env() -> None:
    settings = load_settings(None, {"REDIS_URL": "redis+cluster://r:7000"})
    assert settings.redis_url == "redis+cluster://r:7000"
    assert settings.redis_cluster is True


# -- os.environ/NAME ------------------------------------------------------------------------


def test_os_environ_reads_the_mapping_given_not_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "general_settings:\n  master_key: os.environ/CFG_TEST_KEY\n")
    monkeypatch.setenv("CFG_TEST_KEY", "sk-from-process")
    monkeypatch.setenv("DATABASE_URL", "postgresql://process/db")
    message = config_error(path)
    assert f"{path}: general_settings.master_key: os.environ/CFG_TEST_KEY" in message
    assert "CFG_TEST_KEY is not set" in message
    settings = load_settings(path, {"CFG_TEST_KEY": "sk-from-mapping"})
    assert settings.master_key == "sk-from-mapping"
    assert settings.database_url is None


def test_os_environ_in_lists_and_inside_strings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "litellm_settings:\n  success_callback: [os.environ/CB]\n"
        "budgetd:\n  grpc_addr: os.environ/HOST:os.environ/PORT\n",
    )
    settings = load_settings(path, {"CB": "prometheus", "HOST": "10.1.2.3", "PORT": "5000"})
    assert settings.success_callback == ("prometheus",)
    assert settings.grpc_addr == "10.1.2.3:5000"


def test_resolved_value_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  enforcement: os.environ/MODE\n")
    message = config_error(path, {"MODE": "sometimes"})
    assert f"{path}: budgetd.enforcement: must be one of" in message


def test_environment_variables_section_feeds_references_and_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "environment_variables:\n  MY_KEY: sk-file-env\n  BUDGETD_LOG_LEVEL: error\n"
        "general_settings:\n  master_key: os.environ/MY_KEY\n",
    )
    settings = load_settings(path, {})
    assert settings.master_key == "sk-file-env"
    assert settings.log_level == "error"
    # The real environment wins over the file's environment_variables.
    settings = load_settings(path, {"MY_KEY": "sk-real-env", "BUDGETD_LOG_LEVEL": "info"})
    assert settings.master_key == "sk-real-env"
    assert settings.log_level == "info"


def test_bad_setting_from_environment_variables_section_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "environment_variables:\n  BUDGETD_GRPC_ADDR: nowhere\n")
    assert f"{path}: environment_variables.BUDGETD_GRPC_ADDR: " in config_error(path)


def test_os_environ_without_a_name(tmp_path: Path) -> None:
    path = write(tmp_path, "general_settings:\n  master_key: os.environ/\n")
    assert "must be followed by an environment variable name" in config_error(path)


# -- environment variables and overrides that are wrong -------------------------------------


def test_bad_environment_variable_names_it() -> None:
    message = config_error(None, {"BUDGETD_ENFORCEMENT": "sometimes"})
    assert message == (
        "environment: BUDGETD_ENFORCEMENT: must be one of cross_once, never_exceed "
        "(got 'sometimes')"
    )


def test_bad_database_url_in_env_hides_the_password() -> None:
    message = config_error(None, {"DATABASE_URL": "mysql://u:hunter2@h/db"})
    assert message.startswith("environment: DATABASE_URL: ")
    assert "hunter2" not in message


def test_bad_environment_variable_overridden_on_the_command_line_is_not_an_error() -> None:
    env = {"BUDGETD_GRPC_ADDR": "nowhere"}
    assert load_settings(None, env, {"grpc_addr": "127.0.0.1:1"}).grpc_addr == "127.0.0.1:1"


def test_bad_override_names_it() -> None:
    message = config_error(None, grpc_addr="localhost")
    assert message.startswith("command line: grpc_addr: must be HOST:PORT")


def test_unknown_override() -> None:
    assert config_error(None, grpc_adr="127.0.0.1:1") == (
        "command line: grpc_adr: unknown setting (did you mean 'grpc_addr'?)"
    )
    assert "cannot be set from the command line" in config_error(None, prices={})


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("TRUE", True), ("True", True), ("false", False), ("False", False)],
)
def test_multi_instance_rate_limiting(value: str, expected: bool) -> None:
    env = {"EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING": value, "REDIS_URL": "redis://r:6379"}
    assert load_settings(None, env).multi_instance_rate_limiting is expected


def test_multi_instance_rate_limiting_rejects_other_values() -> None:
    message = config_error(None, {"EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING": "yes"})
    assert message == (
        "environment: EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING: must be true or false (got 'yes')"
    )


def test_multi_instance_rate_limiting_needs_redis() -> None:
    message = config_error(None, {"EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING": "true"})
    assert message.startswith("environment: EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING: needs Redis")


def test_jwt_public_key_url_must_be_http() -> None:
    message = config_error(None, {"JWT_PUBLIC_KEY_URL": "ftp://idp/jwks"})
    assert message.startswith("environment: JWT_PUBLIC_KEY_URL: must be a URL starting with")


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("600", 600.0), ("90s", 90.0), ("10m", 600.0), ("1h", 3600.0), ("1d", 86400.0), ("2.5", 2.5)],
)
def test_reservation_ttl_forms(text: str, seconds: float) -> None:
    assert load_settings(None, {"BUDGETD_RESERVATION_TTL": text}).reservation_ttl == seconds


@pytest.mark.parametrize("text", ["0", "-1", "86401", "1mo", "10 minutes", "nan", "inf"])
def test_reservation_ttl_rejects(text: str) -> None:
    message = config_error(None, {"BUDGETD_RESERVATION_TTL": text})
    assert message.startswith("environment: BUDGETD_RESERVATION_TTL: ")


@pytest.mark.parametrize(
    "address", ["127.0.0.1:0", "0.0.0.0:65535", "[::]:50051", "[::1]:1", "budgetd-0.svc:80"]
)
def test_addresses_accepted(address: str) -> None:
    assert load_settings(None, {}, {"grpc_addr": address}).grpc_addr == address


@pytest.mark.parametrize(
    "address", ["localhost", ":50051", "127.0.0.1:", "127.0.0.1:x", "[::1]50051", "[zz]:1", "a b:1"]
)
def test_addresses_rejected(address: str) -> None:
    assert config_error(None, grpc_addr=address).startswith("command line: grpc_addr: ")


def test_prices_accept_strings_and_integers_exactly(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model_list:\n"
        "  - model_name: a\n"
        "    litellm_params: {model: x/a, input_cost_per_token: '1e-6', output_cost_per_token: 0}\n"
        "  - model_name: b\n"
        "    litellm_params: {model: x/b, input_cost_per_token: 0.1}\n"
        "    model_info: {input_cost_per_token: 0.2, output_cost_per_token: 0.3}\n",
    )
    prices = load_settings(path, {}).prices
    assert prices["a"] == ModelPrice(Decimal("0.000001"), Decimal(0))
    # litellm_params first, model_info for what litellm_params leaves out.
    assert prices["b"] == ModelPrice(Decimal("0.1"), Decimal("0.3"))


def test_same_price_on_two_deployments_is_fine(tmp_path: Path) -> None:
    entry = "  - model_name: m\n    litellm_params: {model: x, input_cost_per_token: 1e-06}\n"
    path = write(tmp_path, "model_list:\n" + entry + entry)
    assert load_settings(path, {}).prices["m"] == ModelPrice(Decimal("0.000001"), Decimal(0))


def test_budgetd_prices_settle_a_conflict(tmp_path: Path) -> None:
    text = fixture("bad_conflicting_prices.yaml").read_text() + (
        "budgetd:\n  prices:\n    gpt-4o: {input_cost_per_token: 1, output_cost_per_token: 2}\n"
    )
    path = write(tmp_path, text)
    assert load_settings(path, {}).prices["gpt-4o"] == ModelPrice(Decimal(1), Decimal(2))


def test_unknown_key_in_provider_params_is_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model_list:\n  - model_name: m\n    litellm_params:\n"
        "      model: bedrock/x\n      aws_region_name: us-east-1\n      vertex_project: p\n",
    )
    assert dict(load_settings(path, {}).prices) == {}


def test_max_budget_below_the_unit_is_rejected(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "litellm_settings:\n  default_team_settings:\n    - {team_id: t, max_budget: 1e-12}\n",
    )
    assert "at least 1e-09" in config_error(path)


def test_redis_cluster_false_with_cluster_url(tmp_path: Path) -> None:
    path = write(
        tmp_path, "budgetd:\n  redis_url: redis+cluster://r:7000\n  redis_cluster: false\n"
    )
    assert f"{path}: budgetd.redis_cluster: is false" in config_error(path)


def test_settings_are_frozen_and_secrets_stay_out_of_repr() -> None:
    settings = load_settings(
        None,
        {"BUDGETD_MASTER_KEY": "sk-very-secret", "DATABASE_URL": "postgresql://u:hunter2@h/d"},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grpc_addr = "x"  # type: ignore[misc]
    assert "sk-very-secret" not in repr(settings)
    assert "hunter2" not in repr(settings)


def test_timezone_and_log_level_normalised(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  timezone: America/New_York\n  log_level: Warning\n")
    settings = load_settings(path, {})
    assert settings.tzinfo == ZoneInfo("America/New_York")
    assert settings.log_level == "warning"


def test_refinements_of_price_keys_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
        "      input_cost_per_token: 1e-06\n      input_cost_per_token_batches: 5e-07\n"
        "      output_cost_per_token_flex: 1e-06\n      input_cost_per_second: 0.001\n"
        "      file_search_cost_per_1k_calls: 2.5\n",
    )
    assert load_settings(path, {}).prices["m"].input_cost_per_token == Decimal("0.000001")


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    assert config_error(path) == f"{path}: has more than 200000 values"


def test_failure_policy_settings_from_the_environment(tmp_path: Path) -> None:
    env = {
        "BUDGETD_DATA_DIR": str(tmp_path),
        "BUDGETD_REDIS_DOWN": "DENY",
        "BUDGETD_POSTGRES_DOWN": "deny",
        "BUDGETD_RECORD_CACHE_TTL": "0",
    }
    settings = load_settings(None, env)
    assert (settings.redis_down, settings.postgres_down) == ("deny", "deny")
    assert settings.record_cache_ttl == 0.0  # every decision reads Postgres
    assert settings.spool_path == tmp_path / "spool"  # follows data_dir unless set
    moved = load_settings(None, {**env, "BUDGETD_SPOOL_DIR": str(tmp_path / "elsewhere")})
    assert moved.spool_path == tmp_path / "elsewhere"
    message = config_error(None, {"BUDGETD_RECORD_CACHE_TTL": "-1"})
    assert "environment: BUDGETD_RECORD_CACHE_TTL: must be from 0 to 3600 seconds" in message


# -- JWT keys and algorithms ------------------------------------------------------------------


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, private: bool = False) -> str:
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _certificate(key: ec.EllipticCurvePrivateKey) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.com")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


JWT_SECRET = "a-shared-secret-of-32-bytes-or-more"  # 35 bytes


def test_jwt_defaults() -> None:
    jwt = load_settings(None, {}).jwt
    assert jwt.algorithms == DEFAULT_ALGORITHMS
    assert jwt.algorithms == (
        *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
        *("ES256", "ES384", "ES512", "EdDSA"),
    )
    assert (jwt.public_key_pem, jwt.hmac_secret, jwt.leeway) == (None, None, 30.0)


@pytest.mark.parametrize(
    ("secret", "hmac"),
    [(JWT_SECRET, ("HS256",)), ("s" * 48, ("HS256", "HS384")), ("s" * 64, HMAC_ALGORITHMS)],
)
def test_jwt_hmac_secret_adds_the_hs_algorithms_it_is_long_enough_for(
    tmp_path: Path, secret: str, hmac: tuple[str, ...]
) -> None:
    path = write(tmp_path, "budgetd:\n  jwt_hmac_secret: os.environ/JWT_TEST_SECRET\n")
    settings = load_settings(path, {"JWT_TEST_SECRET": secret})
    assert settings.jwt.hmac_secret == secret
    assert settings.jwt.algorithms == (*DEFAULT_ALGORITHMS, *hmac)
    assert secret not in repr(settings)


def test_jwt_enabled_with_only_an_hmac_secret(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"general_settings:\n  enable_jwt_auth: true\n"
        f"budgetd:\n  jwt_hmac_secret: {JWT_SECRET}\n  jwt_algorithms: [hs256]\n",
    )
    jwt = load_settings(path, {}).jwt
    assert (jwt.enabled, jwt.algorithms) == (True, ("HS256",))


def test_jwt_public_key_from_the_environment(tmp_path: Path) -> None:
    pem = _pem(ec.generate_private_key(ec.SECP384R1()))
    path = write(
        tmp_path,
        "general_settings:\n  enable_jwt_auth: true\n"
        "budgetd:\n  jwt_public_key: os.environ/IDP_PEM\n",
    )
    settings = load_settings(path, {"IDP_PEM": pem})
    assert settings.jwt.public_key_pem == pem
    assert pem not in repr(settings)
    # A PEM squeezed onto one line with \n escapes, as environment variables often carry it.
    one_line = pem.strip().replace("\n", "\\n")
    assert load_settings(path, {"IDP_PEM": one_line}).jwt.public_key_pem == pem
    message = config_error(path)
    assert f"{path}: budgetd.jwt_public_key: os.environ/IDP_PEM" in message


def test_jwt_public_key_may_be_a_certificate(tmp_path: Path) -> None:
    certificate = _certificate(ec.generate_private_key(ec.SECP256R1()))
    path = write(tmp_path, "budgetd:\n  jwt_public_key: os.environ/IDP_CERT\n")
    assert load_settings(path, {"IDP_CERT": certificate}).jwt.public_key_pem == certificate


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (
            lambda: _pem(ec.generate_private_key(ec.SECP256R1()), private=True),
            "is a private key; give the token issuer's public key",
        ),
        (
            lambda: _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
            "is a 1024-bit RSA key; at least 2048 bits are required",
        ),
        (
            lambda: _pem(ec.generate_private_key(ec.SECP224R1())),
            "is an EC secp224r1 key, which no JWT algorithm uses",
        ),
        (lambda: "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "is not a PEM"),
    ],
    ids=["private key", "weak RSA", "unused curve", "broken PEM"],
)
def test_jwt_public_key_that_cannot_verify_is_refused(
    tmp_path: Path, make: Callable[[], str], fragment: str
) -> None:
    path = write(tmp_path, "budgetd:\n  jwt_public_key: os.environ/IDP_PEM\n")
    message = config_error(path, {"IDP_PEM": make()})
    assert message.startswith(f"{path}: budgetd.jwt_public_key: ")
    assert fragment in message
    assert "PRIVATE" not in message


def test_jwt_algorithms_forms(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  jwt_algorithms: os.environ/ALGS\n")
    jwt = load_settings(path, {"ALGS": "rs256, ES256K,eddsa,RS256"}).jwt
    assert jwt.algorithms == ("RS256", "ES256K", "EdDSA")
    message = config_error(path, {"ALGS": "RS256,NONE"})
    assert f"{path}: budgetd.jwt_algorithms: must not list 'none'" in message
    write(tmp_path, "budgetd:\n  jwt_algorithms: [PS512]\n")
    assert load_settings(path, {}).jwt.algorithms == ("PS512",)
    write(tmp_path, "budgetd:\n  jwt_algorithms: {RS256: true}\n")
    assert "must be a list of JWT algorithms" in config_error(path)
    write(tmp_path, "budgetd:\n  jwt_algorithms: [RS256, 256]\n")
    assert "must list algorithm names (got 256)" in config_error(path)


@pytest.mark.parametrize(
    ("value", "seconds"), [("0", 0.0), ("45", 45.0), ("1m", 60.0), ("5m", 300.0)]
)
def test_jwt_leeway_forms(tmp_path: Path, value: str, seconds: float) -> None:
    path = write(tmp_path, f"budgetd:\n  jwt_leeway: {value}\n")
    assert load_settings(path, {}).jwt.leeway == seconds


@pytest.mark.parametrize("value", ["-1", "6m", ".nan", "true", "soon"])
def test_jwt_leeway_rejects(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"budgetd:\n  jwt_leeway: {value}\n")
    assert config_error(path).startswith(f"{path}: budgetd.jwt_leeway: ")


def test_jwt_audience_and_issuer_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, "budgetd:\n  jwt_audience: file-aud\n  jwt_issuer: file-iss\n")
    jwt = load_settings(path, {}).jwt
    assert (jwt.audience, jwt.issuer) == ("file-aud", "file-iss")
    jwt = load_settings(path, {"JWT_AUDIENCE": "env-aud", "JWT_ISSUER": "env-iss"}).jwt
    assert (jwt.audience, jwt.issuer) == ("env-aud", "env-iss")


def test_jwt_enabled_with_a_jwks_url_from_the_environment(tmp_path: Path) -> None:
    path = fixture("bad_jwt_without_key_source.yaml")
    env = {"JWT_PUBLIC_KEY_URL": "https://a.example/jwks, https://b.example/jwks"}
    jwt = load_settings(path, env).jwt
    assert jwt.enabled is True
    assert jwt.public_key_url == "https://a.example/jwks, https://b.example/jwks"
    # A bad URL is reported as such, not also as a missing key source.
    message = config_error(path, {"JWT_PUBLIC_KEY_URL": "ftp://idp/jwks"})
    assert message.startswith("environment: JWT_PUBLIC_KEY_URL: must be a URL")
    assert "enable_jwt_auth" not in message


def test_jwt_settings_without_enable_jwt_auth_are_checked_but_not_required(
    tmp_path: Path,
) -> None:
    pem = _pem(ec.generate_private_key(ec.SECP256R1()))
    path = write(tmp_path, "budgetd:\n  jwt_public_key: os.environ/IDP_PEM\n")
    jwt = load_settings(path, {"IDP_PEM": pem}).jwt
    assert (jwt.enabled, jwt.public_key_pem) == (False, pem)
