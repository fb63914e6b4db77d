"""Which budgets a request is held against, in which windows — pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import tzinfo

from server.storage.base import CounterState, KeyRecord, ScopeBudget, ScopeKind, TeamRecord
from server.windows import parse_duration, window_at


def team_scope(team: TeamRecord, t: float, tz: tzinfo) -> ScopeBudget:
    """The team's budget in the window containing ``t``."""
    window = window_at(parse_duration(team.budget_duration), t, tz)
    return ScopeBudget(
        ScopeKind.TEAM, team.team_id, team.max_budget_nanos, team.budget_duration, window
    )


def key_scope(key: KeyRecord, t: float, tz: tzinfo) -> ScopeBudget:
    """The key's own budget in the window containing ``t``."""
    window = window_at(parse_duration(key.budget_duration), t, tz)
    return ScopeBudget(ScopeKind.KEY, key.key_id, key.max_budget_nanos, key.budget_duration, window)


def request_scopes(key: KeyRecord, team: TeamRecord, t: float, tz: tzinfo) -> list[ScopeBudget]:
    """Every scope a request of ``key`` is checked and held against, key first (as LiteLLM)."""
    return [key_scope(key, t, tz), team_scope(team, t, tz)]


def tightest(scopes: Sequence[ScopeBudget], states: Sequence[CounterState]) -> int:
    """Index of the limited scope with the least headroom; the team's when none is limited."""
    best, best_left = len(scopes) - 1, None
    for index, (scope, state) in enumerate(zip(scopes, states, strict=True)):
        if scope.limit_nanos is None:
            continue
        left = scope.limit_nanos - state.spend - state.held
        if best_left is None or left < best_left:
            best, best_left = index, left
    return best
