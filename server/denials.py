"""How a decision looks to an HTTP client behind a gateway: status, headers, LiteLLM's body.

Shared by Envoy's ext_authz (in the server) and the HTTP bridge (in clients/), so every
gateway answers a denial the same way. Inputs are plain values so both the domain Decision
and the wire CheckBudgetResponse can be passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# Reasons that mean "who are you?" rather than "you may not": LiteLLM answers these 401.
_AUTH_REASONS = frozenset({"KEY_INVALID", "KEY_EXPIRED", "JWT_INVALID"})
RATE_LIMITED = "RATE_LIMITED"

HEADER_TEAM_ID = "x-budget-team-id"
HEADER_KEY_ALIAS = "x-budget-key-alias"
HEADER_RESERVATION_ID = "x-budget-reservation-id"
HEADER_REMAINING = "x-budget-remaining-usd"
HEADER_STATUS = "x-budget-status"
HEADER_MESSAGE = "x-budget-message"
# What the hold was (USD) and which model the request named: set on allow so a response-side
# step (Envoy ext_proc) can charge the estimate or price the usage without the request body.
HEADER_RESERVED = "x-budget-reserved-usd"
HEADER_MODEL = "x-budget-model"
# Every header budgetd sets upstream: a gateway drops the ones not set on a given allow, so a
# client cannot smuggle its own values past the check.
ALLOW_HEADERS = (
    HEADER_TEAM_ID,
    HEADER_KEY_ALIAS,
    HEADER_RESERVATION_ID,
    HEADER_REMAINING,
    HEADER_RESERVED,
    HEADER_MODEL,
)


@dataclass(frozen=True, slots=True)
class HttpDenial:
    """A denial as an HTTP response: status, LiteLLM's JSON error body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """A rate limit's state for ``x-ratelimit-*`` headers: per minute, left, seconds to reset."""

    limit: int
    remaining: int
    reset: float

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(max(0, math.ceil(self.reset))),
        }


def http_denial(
    reason: str,
    message: str,
    retry_after: float | None,
    *,
    deny_status: int = 400,
    rate: RateHeaders | None = None,
) -> HttpDenial:
    """The HTTP form of a denial with proto reason name ``reason``.

    Budget and policy denials use ``deny_status`` (LiteLLM's 400 ``auth_error`` by default),
    credential problems 401, rate limits 429 with ``retry-after`` and ``x-ratelimit-limit``,
    ``-remaining`` and ``-reset`` (seconds) of the limit that refused.
    """
    headers: dict[str, str] = {}
    if reason == RATE_LIMITED:
        status, kind = 429, "rate_limit_error"
    elif reason in _AUTH_REASONS:
        status, kind = 401, "auth_error"
    else:
        status, kind = deny_status, "auth_error"
    if retry_after is not None and (reason == RATE_LIMITED or status == 429):
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    if rate is not None and reason == RATE_LIMITED:
        headers.update(rate.headers())
    return HttpDenial(status, error_body(status, message, kind), headers)


def allow_headers(
    team_id: str,
    key_alias: str,
    reservation_id: str,
    remaining_usd: float | None,
    *,
    reserved_usd: float | None = None,
    model: str = "",
) -> dict[str, str]:
    """Headers an allowed request carries upstream (``x-budget-*``)."""
    headers = {HEADER_TEAM_ID: team_id, HEADER_RESERVATION_ID: reservation_id}
    if key_alias:
        headers[HEADER_KEY_ALIAS] = key_alias
    if remaining_usd is not None:
        headers[HEADER_REMAINING] = repr(remaining_usd)
    if reserved_usd is not None:
        headers[HEADER_RESERVED] = repr(reserved_usd)
    if model:
        headers[HEADER_MODEL] = model
    return headers


def http_error(status: int, message: str, kind: str = "invalid_request_error") -> HttpDenial:
    """A request refused before any budget question (bad body, too large): same body shape."""
    return HttpDenial(status, error_body(status, message, kind))


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    """LiteLLM's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def split_credential(token: str) -> tuple[str, str]:
    """A bearer token as ``(api_key, jwt)``: budgetd keys start ``sk-``; a token of three
    dot-separated parts that is not one is a JWT; anything else is checked as a key (and
    refused as an invalid one)."""
    if not token.startswith("sk-") and token.count(".") == 2:
        return "", token
    return token, ""
