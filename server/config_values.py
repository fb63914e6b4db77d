"""The checks every configured value goes through: the ``parse_*`` functions.

Each ``parse_*`` function takes a raw value (from YAML, an environment variable or the command
line) and returns the checked value or raises ``ValueError`` with a message that does not name
the key (the caller prefixes where the value came from). They are shared by the file's model
(:mod:`server.config_model`, whose field types run them), environment variables and
command-line overrides (:mod:`server.config_scalars`, :mod:`server.config`).
:func:`describe` renders a rejected value for these messages.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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


def _bounded_seconds(value: object, most: float) -> float:
    """A number of seconds, or a duration such as "30s", from 0 to ``most``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a number of seconds or a duration (got {describe(value)})")
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            seconds = _duration_seconds(value)
    else:
        seconds = float(value)
    if not 0 <= seconds <= most:  # also refuses NaN
        raise ValueError(f"must be from 0 to {most:g} seconds (got {describe(value)})")
    return seconds


def parse_cache_ttl(value: object) -> float:
    """Seconds a cached key or team is used without asking Postgres: 0 to 3600."""
    return _bounded_seconds(value, MAX_RECORD_CACHE_TTL)


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
    return _bounded_seconds(value, MAX_JWT_LEEWAY)
