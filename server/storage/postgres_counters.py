"""Counters on Postgres alone: the exact, slower path used while Redis is down.

Nothing here is a cache, so nothing can be lost or double-counted: a counter's spend *is*
the ledger's sum over its window (``SUM(cost)`` of the scope's rows admitted in it, served
by the ledger's ``(scope, admitted_at)`` indexes), and its ``held`` is the sum of the
unexpired rows of ``budget_holds`` (migration 0002) placed on it.

How this store differs from the Redis and in-process ones, behind the same interface:

* ``settle`` does not add the cost: the caller wrote the ledger row before settling (as
  :meth:`server.authority.Authority.record` always does), and that row already is the
  spend. Settling only releases the hold, so it is naturally idempotent and always reports
  ``applied``; there are no dedupe markers;
* ``read`` never reports a missing counter and ``init`` does nothing: there is nothing to
  rebuild;
* ``reserve`` runs in one transaction under a transaction-level advisory lock keyed by the
  team, so reservations of one team from every replica are serialized: the sums read and
  the holds inserted are one atomic step, as one Lua script is in Redis.

Expired holds are ignored by every sum and purged (at most ``PURGE_LIMIT`` per call) by the
team's next reserve, settle or release. All instants come from the caller's ``now``, never
from the database's clock.

A scope's spend is the record store's own ledger sum (``sum_spend_query``): a key's rows, a
team's, a member's (the team's rows of that ``user_id``), each optionally of one ``model``.

Rate limits (rpm, tpm) are *not* in Postgres: each PostgresCounters keeps its limiters in
process (:class:`~server.storage.memory_limiters.RateLimiters`), checked and charged under the
team's advisory lock after the budgets admit. This is a per-replica approximation while Redis
is down: with N replicas failed over, a limit may admit up to N times its rate, and limiter
state does not carry over to or from Redis (a limiter starts empty on each side of a
failover). Settle corrections are applied once per ``request_id`` within ``dedupe_ttl`` in
this replica (the budget side needs no dedupe here, the rate side does). Budgets stay exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from server.errors import RecordsUnavailable, Unavailable
from server.money import decimal_to_nanos, nanos_to_decimal
from server.rules import Enforcement, admits
from server.storage.base import (
    CounterState,
    RateCharge,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    SettleResult,
)
from server.storage.memory_counters import PURGE_LIMIT, check_nanos, check_scopes, dedupe_seconds
from server.storage.memory_limiters import RateLimiters, check_rates, now_ms

# One conversion of instants, one translation of outages and one ledger sum per scope, shared
# with the record store.
from server.storage.postgres_driver import driver_errors, keep_session, to_timestamp
from server.storage.postgres_ledger import sum_spend_query
from server.storage.postgres_migrations import migrate

_SQL_LOCK_TEAM: Final = "SELECT pg_advisory_xact_lock($1)"
_SQL_PURGE: Final = f"""DELETE FROM budget_holds WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM budget_holds WHERE team_id = $1 AND expires_at <= $2 LIMIT {PURGE_LIMIT}))"""
_SQL_DROP_HOLD: Final = (
    "DELETE FROM budget_holds WHERE team_id = $1 AND reservation_id = $2 AND expires_at > $3"
)
_SQL_DROP_ANY_HOLD: Final = "DELETE FROM budget_holds WHERE team_id = $1 AND reservation_id = $2"
_SQL_HELD: Final = """SELECT counter_id, COALESCE(SUM(amount), 0) AS held FROM budget_holds
    WHERE counter_id = ANY($1::text[]) AND expires_at > $2 GROUP BY counter_id"""
_SQL_HOLD: Final = """INSERT INTO budget_holds
    (reservation_id, counter_id, team_id, scope_kind, scope_id, window_start, amount, expires_at)
    SELECT $1, u.counter_id, $2, u.kind, u.scope_id, u.window_start, $3, $4
    FROM unnest($5::text[], $6::text[], $7::text[], $8::timestamptz[])
        AS u(counter_id, kind, scope_id, window_start)"""


def team_lock_id(team_id: str) -> int:
    """The advisory lock of a team's holds: 64 bits of SHA-256, the same on every replica."""
    digest = hashlib.sha256(f"budgetd-holds:{team_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresCounters:
    """A :class:`~server.storage.base.CounterStore` derived from the ledger, in Postgres.

    Its own small pool (no connection is opened until one is needed, so a replica that
    never falls back to it holds none); ``start()`` applies pending migrations, unless
    ``apply_migrations`` is false: when the record store of the same database applies them
    in the same start (budgetd's server does), a second pass would only cost a connection.
    """

    def __init__(
        self,
        dsn: str,
        *,
        max_size: int = 10,
        command_timeout: float = 5.0,
        apply_migrations: bool = True,
    ) -> None:
        self._dsn = dsn
        self._apply_migrations = apply_migrations
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._limiters = RateLimiters()  # this replica's own: see the module docstring

    async def start(self) -> None:
        """Apply pending migrations (budget_holds) unless told not to, then create the pool."""
        if self._pool is not None:
            return
        if self._apply_migrations:
            try:
                await migrate(self._dsn)
            except RecordsUnavailable as exc:  # the counters' outage, not the record store's
                raise Unavailable(str(exc)) from exc
        async with driver_errors(Unavailable):
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=0,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                timeout=self._command_timeout,
                reset=keep_session,
            )

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()  # nothing here outlives its call: no transaction to finish

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        async with driver_errors(Unavailable):
            if self._pool is None:
                raise Unavailable("postgres unavailable: the counter store is not started")
            async with self._pool.acquire(timeout=self._command_timeout) as conn:
                yield conn

    async def reserve(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        amount: int,
        reservation_id: str,
        hold_expires_at: float,
        now: float,
        mode: Enforcement,
        *,
        rates: Sequence[RateCharge] = (),
    ) -> ReserveResult:
        """Check every scope with the rule, then every rate limit (in process); only if all
        admit, hold ``amount`` on each scope and charge each limit.

        Expired holds are purged first; an earlier hold under the same ``reservation_id``
        is replaced, not added to. With ``amount`` 0 nothing is held.
        """
        check_nanos("amount", amount)
        check_scopes(scopes)
        check_rates(rates, at_reserve=True)
        now_ms(now)
        if amount > 0 and not reservation_id:
            raise ValueError("a hold needs a reservation_id")
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_SQL_LOCK_TEAM, team_lock_id(team_id))
            await conn.execute(_SQL_PURGE, team_id, to_timestamp(now))
            if reservation_id:
                await conn.execute(_SQL_DROP_ANY_HOLD, team_id, reservation_id)
            states = await _states(conn, scopes, now)
            for index, (scope, state) in enumerate(zip(scopes, states, strict=True)):
                if not admits(mode, scope.limit_nanos, state.spend, state.held, amount):
                    return ReserveResult(ReserveStatus.DENIED, states, denied_index=index)
            # Checked and charged with no await in between, under the team's lock. Should the
            # hold's insert or the commit fail after this, the charge stays: a request that
            # then fails with Unavailable counts against this replica's limit, at most once.
            decision = self._limiters.reserve(team_id, rates, now, mode)
            if not decision.admitted:
                return ReserveResult(
                    ReserveStatus.RATE_LIMITED,
                    states,
                    rates=decision.states,
                    rate_index=decision.refused,
                    retry_after=decision.retry_after,
                )
            if amount > 0:
                await conn.execute(
                    _SQL_HOLD,
                    reservation_id,
                    team_id,
                    nanos_to_decimal(amount),
                    to_timestamp(hold_expires_at),
                    [scope.counter_id for scope in scopes],
                    [scope.kind.value for scope in scopes],
                    [scope.scope_id for scope in scopes],
                    [to_timestamp(scope.window.start) for scope in scopes],
                )
                states = tuple(CounterState(s.spend, s.held + amount) for s in states)
        return ReserveResult(ReserveStatus.RESERVED, states, rates=decision.states)

    async def init(
        self,
        team_id: str,
        counters: Sequence[tuple[ScopeBudget, int]],
        now: float,
        *,
        snapshots: Sequence[str | None] = (),
        epoch: str | None = None,
    ) -> bool:
        """Nothing to create: spend is always the ledger's sum."""
        for _scope, spend in counters:
            check_nanos("spend", spend)
        return True

    async def team_epoch(self, team_id: str) -> str:
        """Always "": nothing to invalidate."""
        return ""

    async def settle(
        self,
        team_id: str,
        reservation_id: str,
        scopes: Sequence[ScopeBudget],
        cost: int,
        request_id: str,
        now: float,
        dedupe_ttl: float,
        *,
        xact: int | None = None,
        rates: Sequence[RateCharge] = (),
        release_amount: int | None = None,
    ) -> SettleResult:
        """Release the reservation's hold; the cost is the caller's ledger row, not added here.

        Idempotent, so ``applied`` is always True. The token corrections ``rates`` go to this
        replica's limiters, once per ``request_id`` within ``dedupe_ttl``. A partial release
        (``release_amount``) is for a lease, and leases are only ever taken on Redis (see
        :mod:`server.storage.leasing`): here it leaves holds alone rather than risk shrinking
        one twice on a retry (this store does not deduplicate settles).
        """
        check_nanos("cost", cost)
        check_rates(rates, at_reserve=False)
        if not request_id:
            raise ValueError("settle needs a request_id")
        marker_seconds = dedupe_seconds(dedupe_ttl)
        now_ms(now)
        async with self._connection() as conn:
            await conn.execute(_SQL_PURGE, team_id, to_timestamp(now))
            if reservation_id and release_amount is None:
                await conn.execute(_SQL_DROP_ANY_HOLD, team_id, reservation_id)
            states = await _states(conn, scopes, now)
        # After the statements: a settle that failed with Unavailable is retried by the
        # caller, and its corrections then apply once.
        self._limiters.correct_once(team_id, request_id, rates, now, marker_seconds)
        return SettleResult(True, states)

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters (never missing); expired holds do not count."""
        if not scopes:
            return ()
        async with self._connection() as conn:
            return await _states(conn, scopes, now)

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        """``read``: nothing to journal, a crash cannot part the ledger from spend here."""
        return await self.read(team_id, scopes, now)

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        """Nothing was journaled."""

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold without spending; False when there was none (or it had expired)."""
        async with self._connection() as conn:
            await conn.execute(_SQL_PURGE, team_id, to_timestamp(now))
            status = await conn.execute(_SQL_DROP_HOLD, team_id, reservation_id, to_timestamp(now))
        return status != "DELETE 0"


async def _states(
    conn: PoolConnectionProxy[asyncpg.Record], scopes: Sequence[ScopeBudget], now: float
) -> tuple[CounterState, ...]:
    """Every scope's ledger spend in its window and its unexpired holds, exactly."""
    rows = await conn.fetch(_SQL_HELD, [scope.counter_id for scope in scopes], to_timestamp(now))
    held = {row["counter_id"]: decimal_to_nanos(row["held"]) for row in rows}
    states = []
    for scope in scopes:
        query, args = sum_spend_query(
            scope.kind,
            scope.scope_id,
            scope.window.start,
            scope.window.end,
            scope.user_id,
            scope.model,
            as_of=False,
        )
        spend = await conn.fetchval(query, *args)
        states.append(CounterState(decimal_to_nanos(spend), held.get(scope.counter_id, 0)))
    return tuple(states)
