"""Keeping counters a cache of the ledger: missing counters are rebuilt by setting them."""

from __future__ import annotations

from collections.abc import Sequence

from server.storage.base import CounterState, CounterStore, RecordStore, ScopeBudget


async def rebuild(
    records: RecordStore,
    counters: CounterStore,
    team_id: str,
    scopes: Sequence[ScopeBudget],
    now: float,
) -> None:
    """Create the given counters from exact ledger sums (set-if-absent, never added)."""
    sums = []
    for scope in scopes:
        spend = await records.sum_spend(
            scope.kind, scope.scope_id, scope.window.start, scope.window.end
        )
        sums.append((scope, spend))
    await counters.init(team_id, sums, now)


async def read_states(
    records: RecordStore,
    counters: CounterStore,
    team_id: str,
    scopes: Sequence[ScopeBudget],
    now: float,
) -> tuple[CounterState, ...]:
    """Current counters of ``scopes``, rebuilding any that are missing from the ledger."""
    for _ in range(3):
        states = await counters.read(team_id, scopes, now)
        missing = [scope for scope, state in zip(scopes, states, strict=True) if state is None]
        if not missing:
            return tuple(state for state in states if state is not None)
        await rebuild(records, counters, team_id, missing, now)
    # A counter that vanishes three times in a row (Redis flushing under us): answer from
    # the ledger alone rather than fail a read.
    return tuple(
        [
            CounterState(
                await records.sum_spend(s.kind, s.scope_id, s.window.start, s.window.end), 0
            )
            for s in scopes
        ]
    )
