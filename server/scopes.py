"""Which budgets and rate limits a request is held against, in which windows — pure functions.

A request is made by a :class:`Principal`: a team, the key that authenticated it (None for a
JWT) and, when known, the team member (user) it is for. Its budgets, in the order a denial
is reported: the key's, the team's, the member's, then the per-model budgets
(``model_max_budget``) of key and team for the request's model. Unlimited key and team
budgets are kept (they carry the spend an answer reports); a member or model budget is only
a scope when it has a limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import tzinfo

from server.storage.base import (
    CounterState,
    KeyRecord,
    MemberRecord,
    RateLimit,
    RateUnit,
    ScopeBudget,
    ScopeKind,
    TeamRecord,
)
from server.windows import WindowCache, parse_duration, window_at


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is charged to."""

    team: TeamRecord
    key: KeyRecord | None = None
    user_id: str = ""
    member: MemberRecord | None = None  # the stored membership of user_id, if any

    @property
    def key_id(self) -> str:
        return self.key.key_id if self.key is not None else ""


@dataclass(frozen=True, slots=True)
class MemberTerms:
    """What applies to one member: their own settings, else the team's member defaults."""

    max_budget_nanos: int | None
    budget_duration: str
    rpm_limit: int | None
    tpm_limit: int | None


def member_terms(team: TeamRecord, member: MemberRecord | None) -> MemberTerms:
    """The budget and limits of a member of ``team`` (``member`` None: the defaults)."""
    if member is None:
        member = MemberRecord(team.team_id, "")
    return MemberTerms(
        max_budget_nanos=member.max_budget_nanos
        if member.max_budget_nanos is not None
        else team.member_budget_nanos,
        budget_duration=member.budget_duration
        if member.budget_duration is not None
        else team.member_budget_duration,
        rpm_limit=member.rpm_limit if member.rpm_limit is not None else team.member_rpm_limit,
        tpm_limit=member.tpm_limit if member.tpm_limit is not None else team.member_tpm_limit,
    )


def _scope(
    kind: ScopeKind,
    scope_id: str,
    limit: int | None,
    duration: str,
    t: float,
    tz: tzinfo,
    *,
    user_id: str = "",
    model: str = "",
    windows: WindowCache | None = None,
) -> ScopeBudget:
    if windows is not None:
        window = windows.at(duration, t, tz)
    else:
        window = window_at(parse_duration(duration), t, tz)
    return ScopeBudget(kind, scope_id, limit, duration, window, user_id=user_id, model=model)


def team_scope(
    team: TeamRecord, t: float, tz: tzinfo, windows: WindowCache | None = None
) -> ScopeBudget:
    """The team's budget in the window containing ``t``."""
    return _scope(
        ScopeKind.TEAM,
        team.team_id,
        team.max_budget_nanos,
        team.budget_duration,
        t,
        tz,
        windows=windows,
    )


def key_scope(
    key: KeyRecord, t: float, tz: tzinfo, windows: WindowCache | None = None
) -> ScopeBudget:
    """The key's own budget in the window containing ``t``."""
    return _scope(
        ScopeKind.KEY, key.key_id, key.max_budget_nanos, key.budget_duration, t, tz, windows=windows
    )


def member_scope(
    team: TeamRecord,
    user_id: str,
    member: MemberRecord | None,
    t: float,
    tz: tzinfo,
    windows: WindowCache | None = None,
) -> ScopeBudget:
    """A member's budget within ``team`` (limit None when neither it nor the team sets one)."""
    terms = member_terms(team, member)
    return _scope(
        ScopeKind.MEMBER,
        team.team_id,
        terms.max_budget_nanos,
        terms.budget_duration,
        t,
        tz,
        user_id=user_id,
        windows=windows,
    )


def request_scopes(
    who: Principal,
    t: float,
    tz: tzinfo,
    model: str = "",
    *,
    windows: WindowCache | None = None,
) -> list[ScopeBudget]:
    """Every budget a request is checked and held against, in denial order (see above).

    ``windows`` (optional) remembers window computations across calls (the decision path).
    """
    scopes: list[ScopeBudget] = []
    if who.key is not None:
        scopes.append(key_scope(who.key, t, tz, windows))
    scopes.append(team_scope(who.team, t, tz, windows))
    if who.user_id:
        member = member_scope(who.team, who.user_id, who.member, t, tz, windows)
        if member.limit_nanos is not None:
            scopes.append(member)
    if model:
        owners = [(ScopeKind.TEAM, who.team.team_id, who.team.model_max_budget)]
        if who.key is not None:
            owners.insert(0, (ScopeKind.KEY, who.key.key_id, who.key.model_max_budget))
        for kind, owner, budgets in owners:
            budget = budgets.get(model)
            if budget is not None:
                scopes.append(
                    _scope(
                        kind,
                        owner,
                        budget.limit_nanos,
                        budget.duration,
                        t,
                        tz,
                        model=model,
                        windows=windows,
                    )
                )
    return scopes


def scope_of(scopes: Sequence[ScopeBudget], kind: ScopeKind) -> int | None:
    """Index of the whole-budget (not per-model) scope of ``kind``, or None."""
    for index, scope in enumerate(scopes):
        if scope.kind is kind and not scope.model:
            return index
    return None


def rate_limits(who: Principal) -> list[RateLimit]:
    """Every rpm/tpm limit a request of ``who`` counts against: key, team, member."""
    limits: list[RateLimit] = []

    def add(kind: ScopeKind, scope_id: str, rpm: int | None, tpm: int | None, user: str) -> None:
        if rpm is not None:
            limits.append(RateLimit(kind, scope_id, RateUnit.REQUESTS, rpm, user_id=user))
        if tpm is not None:
            limits.append(RateLimit(kind, scope_id, RateUnit.TOKENS, tpm, user_id=user))

    if who.key is not None:
        add(ScopeKind.KEY, who.key.key_id, who.key.rpm_limit, who.key.tpm_limit, "")
    add(ScopeKind.TEAM, who.team.team_id, who.team.rpm_limit, who.team.tpm_limit, "")
    if who.user_id:
        terms = member_terms(who.team, who.member)
        add(ScopeKind.MEMBER, who.team.team_id, terms.rpm_limit, terms.tpm_limit, who.user_id)
    return limits


def tightest(scopes: Sequence[ScopeBudget], states: Sequence[CounterState]) -> int:
    """Index of the limited scope with the least headroom; the team's when none is limited."""
    best, best_left = scope_of(scopes, ScopeKind.TEAM) or 0, None
    for index, (scope, state) in enumerate(zip(scopes, states, strict=True)):
        if scope.limit_nanos is None:
            continue
        left = scope.limit_nanos - state.spend - state.held
        if best_left is None or left < best_left:
            best, best_left = index, left
    return best
