"""Input checks shared by every entry point; each failure names the field that was wrong."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from server.errors import InvalidArgument
from server.money import MoneyError, usd_to_nanos
from server.windows import Duration, DurationError, parse_duration

MAX_ID = 128
MAX_TEXT = 256
MAX_METADATA_BYTES = 16 * 1024
MAX_MODELS = 256
MAX_TOKENS = 10**9
MAX_JWT = 16 * 1024
MAX_RATE = 10**9  # server.ratelimit.MAX_PER_MINUTE
# Team ids go into Redis hash tags ({t:<id>}), so braces and whitespace are not allowed.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@/+=\-]+$")


def identifier(value: str, field: str, *, required: bool = True) -> str:
    """A non-empty id of at most MAX_ID url-ish characters."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} must not be empty")
        return value
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{field} is longer than {MAX_ID} characters ({len(value)})")
    if not _ID_PATTERN.match(value):
        raise InvalidArgument(
            f"{field} {value!r} may only contain letters, digits and . _ : @ / + = -"
        )
    return value


def text(value: str, field: str, *, limit: int = MAX_TEXT, required: bool = False) -> str:
    """Free text (aliases, model names) of at most ``limit`` characters."""
    if required and not value.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")
    return value


def budget(value: float | None, field: str = "max_budget") -> int | None:
    """An optional USD budget as nano-USD; None means unlimited."""
    if value is None:
        return None
    try:
        return usd_to_nanos(value, field=field)
    except MoneyError as exc:
        raise InvalidArgument(str(exc)) from exc


def cost(value: float, field: str = "cost") -> int:
    """A USD cost as exact nano-USD."""
    try:
        return usd_to_nanos(value, field=field)
    except MoneyError as exc:
        raise InvalidArgument(str(exc)) from exc


def duration(value: str, field: str = "budget_duration") -> Duration | None:
    """A budget_duration ("" for none)."""
    try:
        return parse_duration(value, field=field)
    except DurationError as exc:
        raise InvalidArgument(str(exc)) from exc


def duration_text(value: str | None, field: str = "budget_duration") -> str:
    """A ``budget_duration`` in its normal form ("" = never resets)."""
    parsed = duration(value or "", field)
    return parsed.text if parsed is not None else ""


def tokens(value: int, field: str) -> int:
    if value < 0 or value > MAX_TOKENS:
        raise InvalidArgument(f"{field} must be between 0 and {MAX_TOKENS}, got {value}")
    return value


def limit(value: int | None, field: str) -> int | None:
    """A per-minute rate limit (rpm/tpm): None (no limit) or 1..MAX_RATE."""
    if value is not None and not 1 <= value <= MAX_RATE:
        raise InvalidArgument(f"{field} must be between 1 and {MAX_RATE}, got {value}")
    return value


def models(values: Iterable[str], field: str = "models") -> tuple[str, ...]:
    out = tuple(values)
    if len(out) > MAX_MODELS:
        raise InvalidArgument(f"{field} has more than {MAX_MODELS} entries")
    for name in out:
        text(name, f"{field} entry", required=True)
    return out


def metadata(value: Mapping[str, Any], field: str = "metadata") -> dict[str, Any]:
    out = dict(value)
    if not out:
        return out
    size = len(json.dumps(out, default=str))
    if size > MAX_METADATA_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_METADATA_BYTES} bytes ({size})")
    return out


def instant(value: float | None, field: str) -> float | None:
    if value is not None and (math.isnan(value) or value <= 0):
        raise InvalidArgument(f"{field} must be a valid time")
    return value
