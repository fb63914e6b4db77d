"""Keeping counters a cache of the ledger: missing counters are rebuilt by setting them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from server.errors import Unavailable
from server.storage.base import CounterState, CounterStore, RecordStore, ScopeBudget

log = logging.getLogger("budgetd.ledger_sync")
_REBUILD_ATTEMPTS = 5


async def rebuild(
    records: RecordStore,
    counters: CounterStore,
    team_id: str,
    scopes: Sequence[ScopeBudget],
    now: float,
) -> None:
    """Create the given counters from exact ledger sums (set-if-absent, never added).

    Each counter keeps the snapshot its sum was read in, so settles racing with the rebuild
    are counted exactly once (see :mod:`server.storage.base`); and the sums are read again
    if the team's counters were forgotten while they were being read.
    """
    for _ in range(_REBUILD_ATTEMPTS):
        epoch = await counters.team_epoch(team_id)
        sums: list[tuple[ScopeBudget, int]] = []
        snapshots: list[str | None] = []
        for scope in scopes:
            found = await records.sum_spend_as_of(
                scope.kind,
                scope.scope_id,
                scope.window.start,
                scope.window.end,
                user_id=scope.user_id,
                model=scope.model,
            )
            sums.append((scope, found.total))
            snapshots.append(found.snapshot)
        if await counters.init(team_id, sums, now, snapshots=snapshots, epoch=epoch):
            return
    raise Unavailable(f"the counters of team {team_id} keep being invalidated during rebuilds")


async def start_from_zero(
    counters: CounterStore, team_id: str, scopes: Sequence[ScopeBudget], now: float
) -> None:
    """Create missing counters at 0 because the ledger cannot be read (Postgres is down).

    Right when the counter's window began during the outage: no ledger row can be in it
    yet (spend in it is spooled, and settled into this counter). Wrong only if the counter
    was lost while it held spend, a second fault (Redis flushed or a counter expired while
    Postgres is down): then it undercounts until its window ends. Logged, so an operator
    can tell.
    """
    log.warning(
        "postgres is down: starting counters %s of team %s from 0 (right for a window that "
        "began during the outage)",
        ", ".join(scope.counter_id for scope in scopes),
        team_id,
    )
    await counters.init(team_id, [(scope, 0) for scope in scopes], now)


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
                await records.sum_spend(
                    s.kind,
                    s.scope_id,
                    s.window.start,
                    s.window.end,
                    user_id=s.user_id,
                    model=s.model,
                ),
                0,
            )
            for s in scopes
        ]
    )
