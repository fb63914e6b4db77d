"""The decision path's messages: questions (CheckRequest, SpendRequest) and answers.

Plain data, shared by the authority, the gRPC and Envoy faces, metrics and logs.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from server.storage.base import KeyRecord, RateState, ScopeKind


class Reason(StrEnum):
    """Why a request was denied (names match the proto enum)."""

    NONE = "REASON_UNSPECIFIED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    KEY_INVALID = "KEY_INVALID"
    KEY_EXPIRED = "KEY_EXPIRED"
    KEY_BLOCKED = "KEY_BLOCKED"
    TEAM_BLOCKED = "TEAM_BLOCKED"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    JWT_INVALID = "JWT_INVALID"


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """A CheckBudget question, already off the wire (amounts still USD floats).

    The credential is ``api_key`` or ``jwt`` (one of them).
    """

    api_key: str = ""
    model: str = ""
    estimated_cost: float | None = None
    request_id: str = ""
    user_id: str = ""
    max_tokens: int | None = None
    prompt_tokens: int | None = None
    jwt: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to CheckBudget. A denial is an answer, not an error."""

    allowed: bool
    reason: Reason = Reason.NONE
    message: str = ""
    team_id: str = ""
    key_id: str = ""
    key_alias: str = ""
    scope: ScopeKind | None = None
    spend_nanos: int = 0
    max_budget_nanos: int | None = None
    remaining_nanos: int | None = None
    budget_reset_at: float | None = None
    reservation_id: str = ""
    reserved_nanos: int = 0
    retry_after: float | None = None
    user_id: str = ""
    model: str = ""  # the model of a per-model budget scope
    soft_budget_exceeded: bool = False
    rate: RateState | None = None  # the tightest (or the denying) rate limit
    # An allow from the hot path (server.hot) is its entry's template with this request's
    # reservation_id and reserved_nanos: faces may convert the template once and reuse it.
    template: Decision | None = field(default=None, compare=False, repr=False)
    # Of a hot-path template: what each face derives from it once (its wire form, its
    # metric labels), by the face's own key, so a hot answer finds it with one lookup.
    forms: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class SpendRequest:
    """A RecordSpend call, already off the wire."""

    request_id: str
    reservation_id: str = ""
    api_key: str = ""
    cost: float | None = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpendResult:
    """What RecordSpend recorded: the request's cost and the spends it leaves behind."""

    cost_nanos: int
    team_spend_nanos: int
    key_spend_nanos: int
    duplicate: bool
    # Whose spend it was (for metrics and logs).
    team_id: str = ""
    key_id: str = ""
    key_alias: str = ""


def refusal(
    reason: Reason,
    message: str,
    key: KeyRecord | None = None,
    scope: ScopeKind | None = ScopeKind.KEY,
    *,
    team_id: str = "",
    user_id: str = "",
) -> Decision:
    """A denial decided before any counter was read (bad credential, blocked, model)."""
    return Decision(
        allowed=False,
        reason=reason,
        message=message,
        team_id=key.team_id if key else team_id,
        key_id=key.key_id if key else "",
        key_alias=key.key_alias if key else "",
        scope=scope,
        user_id=user_id,
    )
