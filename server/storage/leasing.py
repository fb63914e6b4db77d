"""Quota leasing: a replica holds a slice of a budget's headroom and admits from it locally.

A decision that goes to Redis costs a script call (most of a CheckBudget's time). So, like
Google's Doorman and Envoy's RLQS, a replica takes a **lease**: one ordinary hold, placed by
the counter store's own atomic reserve with the ``never_exceed`` rule, on every scope of a
request (key, team, member, model budgets). While the lease is young
(``budgetd.lease_seconds``) and has room, requests of those scopes are admitted here,
consuming the lease by their estimates, without touching Redis. Because a lease *is* a hold,
every money invariant stays as it was: headroom leased to one replica is held from every
other, and a lease never exceeds what the store admitted.

What a lease may hold: a fraction (1/:data:`LEASE_FRACTION`) of the smallest headroom of its
scopes as last seen, and at least a few requests' worth — otherwise there is no lease and
each request goes to the store (near a limit every decision is exact, from Redis). Denials
always come from the store, never from a lease.

Settling a leased request adds its cost to the counters like any other (RecordSpend does
that on any replica). The consumed part of a lease stays held until the lease retires (its
time is up or its room is used) and every request admitted under it has settled, been
released or outlived its hold; then the lease's hold is released. Until then the same money
is counted twice — once spent, once held — which errs towards denying, never towards
overspending. A lease's hold expires in the store on its own if this replica dies.

Answers admitted from a lease report the spend seen when the lease was taken (at most
``lease_seconds`` old). Requests with rate limits, and everything while the counters are on
the Postgres fallback path or after a counter went missing (Redis lost data), go to the
store: a lost lease hold must not be spent from.

The code is in three modules: server/storage/lease.py holds the Lease value, a scope set's
identity (lease_key) and the constants that size and bound leasing; lease_book.py holds
LeaseBook, the keeping of leases off the hot path (taking, retiring, releasing, sweeping
and forgetting them); this module holds LeasingCounters, the CounterStore wrapper (a
LeaseBook), with the hot path (admit_from and the _take it calls) on the class itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from collections.abc import Sequence

from server.errors import BudgetdError
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    RateCharge,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    SettleResult,
)
from server.storage.lease import (
    HOT_REQUESTS,
    MAX_OUTSTANDING,
    Lease,
    LeaseKey,
    fits,
    lease_key,
)
from server.storage.lease_book import LeaseBook

_RETRY_GRACE = 60.0  # a settle that failed keeps its request outstanding this long


class LeasingCounters(LeaseBook):
    """A CounterStore that admits from leases of headroom, wrapping the real one."""

    def __init__(
        self,
        inner: CounterStore,
        *,
        lease_seconds: float = 1.0,
        hot_requests: int = HOT_REQUESTS,
        max_outstanding: int = MAX_OUTSTANDING,
    ) -> None:
        self.inner = inner
        self._seconds = lease_seconds
        self._hot_requests = hot_requests
        self._max_outstanding = max_outstanding
        # Per team: the active lease of each scope set, leases retired but still in use,
        # and the headroom last seen for each scope set.
        self._active = {}
        self._retired = {}
        self._seen = {}
        # Decisions per scope set: [second, count in it, count in the second before].
        self._rate = {}
        self._by_reservation = {}
        # One lease is asked for at a time per scope set: concurrent requests wait for it
        # instead of each taking a lease of their own.
        self._pending = {}
        self._prefix = f"lease-{os.urandom(6).hex()}-"
        self._serial = 0
        self._generation = 0  # bumped whenever every lease is forgotten
        self._lease_count = 0  # active leases
        # Per team: overdue settles a lease's reserve claimed, not yet handed to a caller.
        self._claimed = {}
        self.local_admits = 0  # decisions answered here (for tests and the bench)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        """Give back every lease's unused room before closing (a clean stop holds nothing)."""
        leases = [lease for team in self._active.values() for lease in team.values()]
        leases += [lease for group in self._retired.values() for lease in group]
        self._active.clear()
        self._retired.clear()
        for lease in leases:
            # A lease whose requests are still out keeps holding their estimates (it
            # expires in the store); one with none is given back now.
            if lease.lease_id and not lease.outstanding:
                # Closing: a hold not given back now expires in the store by itself.
                with contextlib.suppress(BudgetdError, OSError):
                    await self.inner.release(lease.team_id, lease.lease_id, 0.0)
        await self.inner.close()

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
        """Admit from this replica's lease when it has room; else ask the store."""
        if getattr(self.inner, "failed_over", False):
            # Deciding on the Postgres path: it cannot see holds in Redis, and Redis's
            # counters are rebuilt when it returns, so no lease taken there is trusted again.
            self._forget_all()
        if rates or self._seconds <= 0 or amount < 0 or getattr(self.inner, "failed_over", False):
            result = await self._guard(
                self.inner.reserve(
                    team_id, scopes, amount, reservation_id, hold_expires_at, now, mode,
                    rates=rates,
                )
            )  # fmt: skip
            return self._hand_over(team_id, result)
        key = lease_key(scopes, mode)
        self._count((team_id, key), now)
        await self._sweep(team_id, now)
        # Past max_outstanding leased requests out (never settled?), the store decides each
        # request as a plain hold until some settle or expire. No new lease either: one taken
        # per request would hold a slice of the headroom each, denying everyone soon.
        if len(self._by_reservation) < self._max_outstanding:
            lease = self._active.get(team_id, {}).get(key)
            if lease is not None:
                if fits(lease, amount, now):
                    return self._admit(lease, amount, reservation_id, hold_expires_at)
                await self._retire(lease, now)
            pending = self._pending.get((team_id, key))
            if pending is not None:  # another request is asking for this lease right now
                lease = await asyncio.shield(pending)
            else:
                lease = await self._lease_once(key, team_id, scopes, amount, hold_expires_at, now)
            if lease is not None and fits(lease, amount, now):
                return self._hand_over(
                    team_id, self._admit(lease, amount, reservation_id, hold_expires_at)
                )
        result = await self._guard(
            self.inner.reserve(team_id, scopes, amount, reservation_id, hold_expires_at, now, mode)
        )
        self._observe(key, team_id, result)
        return self._hand_over(team_id, result)

    def _hand_over(self, team_id: str, result: ReserveResult) -> ReserveResult:
        """``result`` with the overdue settles a lease's reserve claimed for the team (see
        LeaseBook._keep_claimed): the caller recovers them, as after any reserve."""
        claimed = self._claimed.pop(team_id, None) if self._claimed else None
        if not claimed:
            return result
        return dataclasses.replace(result, unsettled=(*result.unsettled, *claimed))

    def lease_for(self, team_id: str, key: LeaseKey) -> Lease | None:
        """This replica's live lease for the scope set ``key`` of ``team_id``, or None.

        A handle for :meth:`admit_from`: a caller may keep it, since a lease that retires
        (its time is up, its room used, the store failed) admits nothing more.
        """
        team = self._active.get(team_id)
        return team.get(key) if team is not None else None

    def admit_from(
        self,
        lease: Lease,
        amount: int,
        reservation_id: str,
        hold_expires_at: float,
        now: float,
    ) -> tuple[CounterState, ...] | None:
        """The part of :meth:`reserve` that needs no await: admit from ``lease`` when it is
        live and has room and time, returning the counters as the lease saw them; None means
        "call :meth:`reserve`" (a lease retired, used up or out of time, the store failed
        over, too many leased requests out).

        Rate-limited requests must not come here (their limits are checked in the store).
        """
        if amount < 0 or self._seconds <= 0 or getattr(self.inner, "failed_over", False):
            return None
        if not fits(lease, amount, now):  # a retired lease never fits
            return None
        if len(self._by_reservation) >= self._max_outstanding:
            return None
        rate = lease.rate
        if rate[0] == int(now):
            rate[1] += 1  # (LeaseBook._count, inlined: every hot request counts)
        else:
            lease.rate = self._count(lease.which, now)
        self._take(lease, amount, reservation_id, hold_expires_at)
        return lease.states

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
        """Add the cost; a leased request gives its part of the lease's hold back with it.

        The lease's room here is not given back (the money it held is now spend), only its
        hold in the store shrinks, in the same atomic step that adds the cost.
        """
        lease = self._by_reservation.pop(reservation_id, None) if reservation_id else None
        if lease is None:
            return await self._guard(
                self.inner.settle(
                    team_id, reservation_id, scopes, cost, request_id, now, dedupe_ttl,
                    xact=xact, rates=rates, release_amount=release_amount,
                )
            )  # fmt: skip
        amount, _ = lease.outstanding.pop(reservation_id, (0, 0.0))
        # A cost above the estimate (0 without one) is room this replica no longer has.
        lease.consumed += max(0, cost - amount)
        part = lease.lease_id if lease.lease_id and amount > 0 else ""
        try:
            result = await self._guard(
                self.inner.settle(
                    team_id, part, scopes, cost, request_id, now, dedupe_ttl,
                    xact=xact, rates=rates, release_amount=amount if part else None,
                )
            )  # fmt: skip
        except BaseException:
            # Not settled: the caller retries (or crash recovery settles it), and the retry
            # must find the request still outstanding under its lease.
            lease.outstanding[reservation_id] = (amount, now + _RETRY_GRACE)
            self._by_reservation[reservation_id] = lease
            lease.consumed -= max(0, cost - amount)
            raise
        await self._release_if_done(lease, now)
        if any(state is None for state in result.states):
            await self._forget_team(team_id, now)  # the store lost counters: trust no lease
        return result

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold; a leased request's estimate goes back to its lease."""
        lease = self._by_reservation.pop(reservation_id, None)
        if lease is None:
            return await self._guard(self.inner.release(team_id, reservation_id, now))
        amount, _ = lease.outstanding.pop(reservation_id, (0, 0.0))
        lease.consumed -= amount
        await self._release_if_done(lease, now)
        return True

    async def init(
        self,
        team_id: str,
        counters: Sequence[tuple[ScopeBudget, int]],
        now: float,
        *,
        snapshots: Sequence[str | None] = (),
        epoch: str | None = None,
    ) -> bool:
        return await self._guard(
            self.inner.init(team_id, counters, now, snapshots=snapshots, epoch=epoch)
        )

    async def team_epoch(self, team_id: str) -> str:
        return await self._guard(self.inner.team_epoch(team_id))

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        return await self._guard(self.inner.read(team_id, scopes, now))

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        return await self._guard(self.inner.begin_settle(team_id, scopes, request_id, now, grace))

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        await self._guard(self.inner.abandon_settle(team_id, request_id, now))

    # -- leases -------------------------------------------------------------------------

    def _admit(
        self, lease: Lease, amount: int, reservation_id: str, expires_at: float
    ) -> ReserveResult:
        self._take(lease, amount, reservation_id, expires_at)
        return ReserveResult(ReserveStatus.RESERVED, states=lease.states)

    def _take(self, lease: Lease, amount: int, reservation_id: str, expires_at: float) -> None:
        """Admit one request of ``amount`` from ``lease`` (it fits: the caller checked)."""
        lease.consumed += amount
        if reservation_id:
            lease.outstanding[reservation_id] = (amount, expires_at)
            self._by_reservation[reservation_id] = lease
        self.local_admits += 1
