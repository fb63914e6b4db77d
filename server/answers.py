"""How a decision is put into words: the Decision and SpendResult the authority answers.

Pure functions of the principal, its scopes and what the counter store found.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.decision import Decision, Reason, SpendResult, refusal
from server.scopes import Principal, scope_of
from server.storage.base import (
    CounterState,
    RateCharge,
    RateState,
    RateUnit,
    ReserveResult,
    ScopeBudget,
    ScopeKind,
)


def spend_result(
    cost: int,
    who: Principal,
    scopes: Sequence[ScopeBudget],
    states: Sequence[CounterState],
    *,
    duplicate: bool,
) -> SpendResult:
    def spend_of(kind: ScopeKind) -> int:
        index = scope_of(scopes, kind)
        return states[index].spend if index is not None else 0

    return SpendResult(
        cost,
        spend_of(ScopeKind.TEAM),
        spend_of(ScopeKind.KEY),
        duplicate,
        who.team.team_id,
        who.key_id,
        who.key.key_alias if who.key is not None else "",
    )


def model_refusal(who: Principal, model: str) -> Decision | None:
    if not model:
        return None
    lists = [(ScopeKind.TEAM, who.team.models)]
    if who.key is not None:
        lists.insert(0, (ScopeKind.KEY, who.key.models))
    for scope, allowed in lists:
        if allowed and model not in allowed and "all-proxy-models" not in allowed:
            return refusal(
                Reason.MODEL_NOT_ALLOWED,
                f"{scope.value} not allowed to access model={model}."
                f" Allowed models: {list(allowed)}",
                who.key,
                scope,
                team_id=who.team.team_id,
                user_id=who.user_id,
            )
    return None


def soft_budget_exceeded(
    who: Principal, scopes: Sequence[ScopeBudget], states: Sequence[CounterState]
) -> bool:
    """Has the key's or the team's spend in its window reached its soft_budget?"""
    soft = {ScopeKind.TEAM: who.team.soft_budget_nanos}
    if who.key is not None:
        soft[ScopeKind.KEY] = who.key.soft_budget_nanos
    for kind, threshold in soft.items():
        index = scope_of(scopes, kind)
        if threshold is not None and index is not None and states[index].spend >= threshold:
            return True
    return False


def tightest_rate(rates: Sequence[RateState]) -> RateState | None:
    return min(rates, key=lambda r: (r.remaining, -r.reset_after), default=None)


_RATE_SCOPE_NAMES = {ScopeKind.KEY: "key", ScopeKind.TEAM: "team", ScopeKind.MEMBER: "member"}


def rate_denial(
    who: Principal,
    scopes: Sequence[ScopeBudget],
    rates: Sequence[RateCharge],
    result: ReserveResult,
) -> Decision:
    limit = rates[result.rate_index].limit
    state = result.rates[result.rate_index] if result.rates else None
    name = {ScopeKind.KEY: who.key_id, ScopeKind.TEAM: who.team.team_id}.get(
        limit.kind, f"{limit.user_id} in team {who.team.team_id}"
    )
    unit = "requests" if limit.unit is RateUnit.REQUESTS else "tokens"
    retry = round(result.retry_after, 3)
    message = (
        f"Rate limit exceeded for {_RATE_SCOPE_NAMES[limit.kind]} {name}:"
        f" {limit.unit.value}_limit {limit.per_minute} ({unit} per minute)."
        f" Try again in {retry:g} seconds."
    )
    index = scope_of(scopes, ScopeKind.TEAM) or 0
    return Decision(
        allowed=False,
        reason=Reason.RATE_LIMITED,
        message=message,
        team_id=who.team.team_id,
        key_id=who.key_id,
        key_alias=who.key.key_alias if who.key is not None else "",
        scope=limit.kind,
        spend_nanos=result.states[index].spend if result.states else 0,
        max_budget_nanos=scopes[index].limit_nanos,
        retry_after=retry,
        user_id=who.user_id,
        rate=state,
    )


def decision(
    allowed: bool,
    who: Principal,
    scope: ScopeBudget,
    state: CounterState,
    now: float,
    *,
    reason: Reason = Reason.NONE,
    message: str = "",
    reservation_id: str = "",
    reserved: int = 0,
    soft: bool = False,
    rate: RateState | None = None,
) -> Decision:
    limit = scope.limit_nanos
    remaining = None if limit is None else max(0, limit - state.spend - state.held)
    reset_at = float(scope.window.end) if scope.window.end is not None else None
    retry_after = None
    if not allowed and reset_at is not None:
        retry_after = round(max(0.0, reset_at - now), 3)
    return Decision(
        allowed=allowed,
        reason=reason,
        message=message,
        team_id=who.team.team_id,
        key_id=who.key_id,
        key_alias=who.key.key_alias if who.key is not None else "",
        scope=scope.kind,
        spend_nanos=state.spend,
        max_budget_nanos=limit,
        remaining_nanos=remaining,
        budget_reset_at=reset_at,
        reservation_id=reservation_id,
        reserved_nanos=reserved if allowed else 0,
        retry_after=retry_after,
        user_id=who.user_id,
        model=scope.model,
        soft_budget_exceeded=soft,
        rate=rate,
    )


def admitted(template: Decision, reservation_id: str, reserved: int) -> Decision:
    """The allow of one hot-path request: ``template`` with its reservation and estimate."""
    t = template
    return Decision(
        allowed=True,
        team_id=t.team_id,
        key_id=t.key_id,
        key_alias=t.key_alias,
        scope=t.scope,
        spend_nanos=t.spend_nanos,
        max_budget_nanos=t.max_budget_nanos,
        remaining_nanos=t.remaining_nanos,
        budget_reset_at=t.budget_reset_at,
        reservation_id=reservation_id,
        reserved_nanos=reserved,
        user_id=t.user_id,
        model=t.model,
        soft_budget_exceeded=t.soft_budget_exceeded,
        template=t,
    )
