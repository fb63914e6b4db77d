"""Counters in Redis, falling back to the exact Postgres path while Redis is down.

``budgetd.redis_down: postgres`` (the default with Postgres and Redis). :class:`FailoverCounters`
sends every call to :class:`~server.storage.redis_counters.RedisCounters`. When one fails
with Unavailable, this replica switches to
:class:`~server.storage.postgres_counters.PostgresCounters` (logged, and counted in
``budgetd_counter_failovers``), repeats the call there and keeps deciding on Postgres,
exact and slower. It probes Redis with a PING at most once per ``probe_interval`` seconds,
in the background (a decision never waits for a probe).

While failed over, spend goes to the ledger only: the Redis counters of every team this
replica served missed it. So when Redis answers again, the counters of exactly those teams
are deleted first (``RedisCounters.forget_teams``, which also changes the team's epoch so
that no rebuild that summed the ledger before can recreate them), and only then are calls
sent to Redis again; the next decision of each such team rebuilds its counters from the
ledger, by setting them. Teams this replica did not touch kept exact counters.

Other replicas decide on their own: one that still reaches Redis keeps using its counters,
which miss what a failed-over replica spent until that replica returns and forgets them
(decisions there may be that much too lenient meanwhile; the ledger is exact throughout).

Rate limits follow the same switch: in Redis normally, in the Postgres store's per-replica
limiters while failed over (see :mod:`server.storage.postgres_counters`). Nothing is carried
across a switch: rate state is not money, and a minute later it has drained anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    RateCharge,
    ReserveResult,
    ScopeBudget,
    SettleResult,
)

if TYPE_CHECKING:
    from server.storage.postgres_counters import PostgresCounters
    from server.storage.redis_counters import RedisCounters

log = logging.getLogger("budgetd.counters")
T = TypeVar("T")


class FailoverCounters:
    """A :class:`~server.storage.base.CounterStore`: Redis, or Postgres while Redis is down."""

    def __init__(
        self,
        redis: RedisCounters,
        postgres: PostgresCounters,
        *,
        probe_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.postgres = postgres
        self._probe_interval = probe_interval
        self._clock = clock
        self._failed_since: float | None = None
        self._next_probe = 0.0
        self._touched: set[str] = set()  # teams served on Postgres since the failover
        self._probe: asyncio.Task[None] | None = None
        self.failovers = 0
        # Called at each switch to Postgres (the budgetd_counter_failovers metric).
        self.on_failover: Callable[[], None] | None = None

    @property
    def failed_over(self) -> bool:
        """True while this replica decides on Postgres."""
        return self._failed_since is not None

    async def start(self) -> None:
        """Start both stores; a Redis that is down at start means starting failed over."""
        await self.postgres.start()
        try:
            await self.redis.start()
        except Unavailable as exc:
            self._fail(exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.redis.close()
        await self.postgres.close()

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
        return await self._call(
            team_id,
            lambda store: store.reserve(
                team_id, scopes, amount, reservation_id, hold_expires_at, now, mode, rates=rates
            ),
        )

    async def init(
        self,
        team_id: str,
        counters: Sequence[tuple[ScopeBudget, int]],
        now: float,
        *,
        snapshots: Sequence[str | None] = (),
        epoch: str | None = None,
    ) -> bool:
        return await self._call(
            team_id,
            lambda store: store.init(team_id, counters, now, snapshots=snapshots, epoch=epoch),
        )

    async def team_epoch(self, team_id: str) -> str:
        return await self._call(team_id, lambda store: store.team_epoch(team_id))

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
        return await self._call(
            team_id,
            lambda store: store.settle(
                team_id,
                reservation_id,
                scopes,
                cost,
                request_id,
                now,
                dedupe_ttl,
                xact=xact,
                rates=rates,
                release_amount=release_amount,
            ),
        )

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        return await self._call(team_id, lambda store: store.read(team_id, scopes, now))

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        return await self._call(
            team_id, lambda store: store.begin_settle(team_id, scopes, request_id, now, grace)
        )

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        await self._call(team_id, lambda store: store.abandon_settle(team_id, request_id, now))

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        return await self._call(team_id, lambda store: store.release(team_id, reservation_id, now))

    async def _call(self, team_id: str, op: Callable[[CounterStore], Awaitable[T]]) -> T:
        if self.failed_over:
            self._maybe_probe()
        if not self.failed_over:
            try:
                return await op(self.redis)
            except Unavailable as exc:
                # Redis may have applied the call before the connection broke: the team is
                # forgotten on recovery anyway, so nothing it did there is trusted.
                self._fail(exc)
        self._touched.add(team_id)
        try:
            return await op(self.postgres)
        except Unavailable:
            # Postgres is down too: waiting out the probe interval would only keep failing
            # calls that Redis, if it is back, could answer. Probe now (one at a time).
            self._maybe_probe(now=True)
            raise

    def _fail(self, error: Unavailable) -> None:
        if self._failed_since is None:
            self._failed_since = self._clock()
            self._next_probe = self._failed_since + self._probe_interval
            self.failovers += 1
            if self.on_failover is not None:
                self.on_failover()
            log.warning("redis is down (%s): deciding on the exact postgres path", error)

    def _maybe_probe(self, *, now: bool = False) -> None:
        """Start a probe of Redis, at most once per probe interval (or ``now``), one at a time.

        In a task of its own: a decision never waits for a PING to a Redis that may not
        answer for a while (a partition that drops packets, rather than refusing them).
        """
        if self._probe is not None and not self._probe.done():
            return
        if not now and self._clock() < self._next_probe:
            return
        self._next_probe = self._clock() + self._probe_interval
        self._probe = asyncio.ensure_future(self._recover())

    async def wait_for_probe(self) -> None:
        """Until the probe in progress (if any) is done."""
        if self._probe is not None:
            await asyncio.shield(self._probe)

    async def _recover(self) -> None:
        """PING Redis; if it answers, forget the teams served meanwhile and switch back."""
        try:
            await self.redis.ping()
            # Teams touched while we forget are forgotten in the next round; the switch
            # back happens with no await after the last round, so none is missed.
            while self._touched:
                batch = set(self._touched)
                await self.redis.forget_teams(batch)
                self._touched -= batch
        except Unavailable:
            return
        if self._failed_since is None:
            return  # another call recovered meanwhile
        log.warning(
            "redis is back after %.1f s: counters of the teams served meanwhile are rebuilt "
            "from the ledger",
            self._clock() - self._failed_since,
        )
        self._failed_since = None
