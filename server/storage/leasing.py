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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from server.errors import BudgetdError, Unavailable
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
from server.storage.memory_counters import MAX_PARTIAL_RELEASE

T = TypeVar("T")
_RETRY_GRACE = 60.0  # a settle that failed keeps its request outstanding this long

LEASE_FRACTION = 16  # a lease holds at most this fraction of the headroom it was cut from
MIN_LEASE_REQUESTS = 8  # ... and at least this many requests' worth, or there is no lease
# Bounds on memory: active leases and remembered headroom (past them, requests go to the
# store), and requests admitted from leases that are not settled yet (each ~200 bytes).
MAX_LEASES = 10_000
# Only a hot scope set gets a lease: one that saw this many decisions here in the current or
# the previous second. Quiet keys are decided by the store, so an idle key holds nothing.
HOT_REQUESTS = 32
MAX_OUTSTANDING = 200_000


# A scope set's identity: (mode, (counter id, limit) per scope).
LeaseKey = tuple[str, tuple[tuple[str, int | None], ...]]
_Key = LeaseKey


@dataclass(slots=True)
class Lease:
    """One lease: a hold in the store that this replica admits requests from.

    Outside this module it is an opaque handle (see :meth:`LeasingCounters.lease_for`).
    """

    team_id: str
    lease_id: str  # the hold's id in the store; "" when nothing is held (no limited scope)
    granted: int | None  # None: every scope is unlimited
    admit_until: float
    states: tuple[CounterState, ...]  # the counters as the store answered the lease
    consumed: int = 0
    # Requests admitted and not yet settled: reservation id -> (amount, hold expiry), in
    # admission order. Ordered for the sweep, which frees expired ones from the front: a
    # plain dict only compacts as it grows, so on a retired lease (which no longer grows)
    # each next(iter()) would rescan every slot freed before it, quadratic in the requests
    # a sweep frees (measured: 11 ms for one second's 8,500 requests, 340 ms for 50,000).
    outstanding: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)
    retired: bool = False
    which: tuple[str, LeaseKey] = ("", ("", ()))  # (team_id, the scope set it was taken for)

    def room(self) -> int | None:
        return None if self.granted is None else self.granted - self.consumed


def _fits(lease: Lease, amount: int, now: float) -> bool:
    """May a request estimated at ``amount`` be admitted from ``lease`` now?"""
    if now >= lease.admit_until or lease.retired:
        return False
    room = lease.room()
    return room is None or (room > 0 and amount <= room)


def lease_key(scopes: Sequence[ScopeBudget], mode: Enforcement) -> LeaseKey:
    """The identity of a scope set's lease: the enforcement rule and each counter's id and
    limit (a new window or a changed limit is another scope set)."""
    return (mode.value, tuple((s.counter_id, s.limit_nanos) for s in scopes))


class LeasingCounters:
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
        self._active: dict[str, dict[_Key, Lease]] = {}
        self._retired: dict[str, list[Lease]] = {}
        self._seen: dict[tuple[str, _Key], tuple[CounterState, ...]] = {}
        # Decisions per scope set: (second, count in it, count in the second before).
        self._rate: dict[tuple[str, _Key], tuple[int, int, int]] = {}
        self._by_reservation: dict[str, Lease] = {}
        # One lease is asked for at a time per scope set: concurrent requests wait for it
        # instead of each taking a lease of their own.
        self._pending: dict[tuple[str, _Key], asyncio.Future[Lease | None]] = {}
        self._prefix = f"lease-{os.urandom(6).hex()}-"
        self._serial = 0
        self._generation = 0  # bumped whenever every lease is forgotten
        self._lease_count = 0  # active leases
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
            return await self._guard(
                self.inner.reserve(
                    team_id, scopes, amount, reservation_id, hold_expires_at, now, mode,
                    rates=rates,
                )
            )  # fmt: skip
        key = lease_key(scopes, mode)
        self._count((team_id, key), now)
        await self._sweep(team_id, now)
        # Past max_outstanding leased requests out (never settled?), the store decides each
        # request as a plain hold until some settle or expire. No new lease either: one taken
        # per request would hold a slice of the headroom each, denying everyone soon.
        if len(self._by_reservation) < self._max_outstanding:
            lease = self._active.get(team_id, {}).get(key)
            if lease is not None:
                if _fits(lease, amount, now):
                    return self._admit(lease, amount, reservation_id, hold_expires_at)
                await self._retire(lease, now)
            pending = self._pending.get((team_id, key))
            if pending is not None:  # another request is asking for this lease right now
                lease = await asyncio.shield(pending)
            else:
                lease = await self._lease_once(key, team_id, scopes, amount, hold_expires_at, now)
            if lease is not None and _fits(lease, amount, now):
                return self._admit(lease, amount, reservation_id, hold_expires_at)
        result = await self._guard(
            self.inner.reserve(team_id, scopes, amount, reservation_id, hold_expires_at, now, mode)
        )
        self._observe(key, team_id, result)
        return result

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
        if not _fits(lease, amount, now):  # a retired lease never fits
            return None
        if len(self._by_reservation) >= self._max_outstanding:
            return None
        self._count(lease.which, now)
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

    async def _lease_once(
        self,
        key: _Key,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        amount: int,
        hold_expires_at: float,
        now: float,
    ) -> Lease | None:
        """:meth:`_new_lease`, with concurrent callers for the same scopes waiting on it."""
        future: asyncio.Future[Lease | None] = asyncio.get_running_loop().create_future()
        self._pending[(team_id, key)] = future
        try:
            lease = await self._new_lease(key, team_id, scopes, amount, hold_expires_at, now)
        except BaseException:
            future.set_result(None)
            raise
        finally:
            del self._pending[(team_id, key)]
        future.set_result(lease)
        return lease

    async def _new_lease(
        self,
        key: _Key,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        amount: int,
        hold_expires_at: float,
        now: float,
    ) -> Lease | None:
        """A lease cut from the headroom seen last time, or None (too little, or unknown)."""
        generation = self._generation
        seen = self._seen.get((team_id, key))
        if seen is None or not self._hot((team_id, key), now):
            return None  # first sight (a plain reservation tells the headroom), or quiet
        headroom = [
            scope.limit_nanos - state.spend - state.held
            for scope, state in zip(scopes, seen, strict=True)
            if scope.limit_nanos is not None
        ]
        until = now + self._seconds
        if not headroom:  # nothing limited: refresh the counters' view now and then
            result = await self.inner.reserve(
                team_id, scopes, 0, "", hold_expires_at, now, Enforcement.NEVER_EXCEED
            )
            if result.status is not ReserveStatus.RESERVED:
                self._observe(key, team_id, result)
                return None
            lease = Lease(team_id, "", None, until, result.states, which=(team_id, key))
        else:
            # Below 2^53: the store shrinks a lease's hold with exact arithmetic.
            size = min(min(headroom) // LEASE_FRACTION, MAX_PARTIAL_RELEASE - 1)
            if size < max(amount, 1) * MIN_LEASE_REQUESTS:
                return None
            self._serial += 1
            lease_id = f"{self._prefix}{self._serial}"
            result = await self.inner.reserve(
                team_id, scopes, size, lease_id, hold_expires_at + self._seconds, now,
                Enforcement.NEVER_EXCEED,
            )  # fmt: skip
            if result.status is not ReserveStatus.RESERVED:
                self._observe(key, team_id, result)
                return None
            lease = Lease(team_id, lease_id, size, until, result.states, which=(team_id, key))
        if generation != self._generation:
            # The store failed (or failed over) while this lease was being taken: it is
            # not spent from; its hold is given back, or expires.
            lease.retired = True
            self._retired.setdefault(team_id, []).append(lease)
            await self._release_if_done(lease, now)
            return None
        team = self._active.setdefault(team_id, {})
        if self._lease_count >= MAX_LEASES:
            # Bounded: past this many, requests go to the store (this lease's room is
            # given back at once: it has no requests yet).
            lease.retired = True
            if lease.lease_id:
                await self.inner.release(team_id, lease.lease_id, now)
            return None
        team[key] = lease
        self._lease_count += 1
        return lease

    def _count(self, which: tuple[str, _Key], now: float) -> None:
        second = int(now)
        seen = self._rate.get(which)
        if seen is not None and seen[0] == second:
            # Again in the same second (every hot request): just count. The entry moves to
            # the recent end of the eviction order once a second, in the branch below.
            self._rate[which] = (second, seen[1] + 1, seen[2])
            return
        last, count, before = self._rate.pop(which, (second, 0, 0))
        if last == second:
            self._rate[which] = (second, count + 1, before)
        else:
            self._rate[which] = (second, 1, count if last == second - 1 else 0)
        if len(self._rate) > MAX_LEASES:
            del self._rate[next(iter(self._rate))]  # the least recently used

    def _hot(self, which: tuple[str, _Key], now: float) -> bool:
        last, count, before = self._rate.get(which, (0, 0, 0))
        if last != int(now):
            return False
        return max(count, before) >= self._hot_requests

    def _observe(self, key: _Key, team_id: str, result: ReserveResult) -> None:
        """Remember the headroom a store answer showed; a missing counter voids leases."""
        seen = (team_id, key)
        self._seen.pop(seen, None)
        if result.status is not ReserveStatus.MISSING and result.states:
            self._seen[seen] = result.states
            if len(self._seen) > MAX_LEASES:
                del self._seen[next(iter(self._seen))]  # the oldest

    async def _retire(self, lease: Lease, now: float) -> None:
        """No more admissions from ``lease``; release it once its requests are done."""
        team = self._active.get(lease.team_id, {})
        for key in [k for k, v in team.items() if v is lease]:
            del team[key]
            self._lease_count -= 1
            self._seen.pop((lease.team_id, key), None)  # the next lease uses fresh headroom
        if not team:
            self._active.pop(lease.team_id, None)
        lease.retired = True
        self._retired.setdefault(lease.team_id, []).append(lease)
        await self._release_if_done(lease, now)

    async def _release_if_done(self, lease: Lease, now: float) -> bool:
        """Release a retired lease whose requests are all done; True when it was."""
        if not lease.retired or lease.outstanding:
            return False
        group = self._retired.get(lease.team_id)
        if group is not None and lease in group:
            group.remove(lease)
            if not group:
                del self._retired[lease.team_id]
        if lease.lease_id:
            # The store down: the hold expires there by itself (lease time + hold TTL).
            with contextlib.suppress(Unavailable):
                await self.inner.release(lease.team_id, lease.lease_id, now)
        return True

    async def _sweep(self, team_id: str, now: float) -> None:
        """Retire the team's leases whose time is up (a new window makes new scope sets, so
        old ones are never asked for again); requests whose holds expired free theirs."""
        for lease in [x for x in self._active.get(team_id, {}).values() if now >= x.admit_until]:
            await self._retire(lease, now)
        for lease in list(self._retired.get(team_id, ())):
            # Admission order is (nearly) expiry order: drop from the front while expired,
            # so a sweep costs what it frees, not what is outstanding.
            while lease.outstanding:
                rid = next(iter(lease.outstanding))
                if lease.outstanding[rid][1] > now:
                    break
                del lease.outstanding[rid]
                self._by_reservation.pop(rid, None)
            await self._release_if_done(lease, now)

    async def _guard(self, call: Awaitable[T]) -> T:
        """``call``; when the store fails, stop admitting from every lease (a lease is only
        spent while the store that holds it is known to be up: ``redis_down: deny`` means
        no decision without Redis)."""
        try:
            return await call
        except Unavailable:
            self._forget_all()
            raise

    def _forget_all(self) -> None:
        """Retire every active lease at once (their holds are released once done, or expire)."""
        self._generation += 1
        for team_id, team in list(self._active.items()):
            for lease in team.values():
                lease.retired = True
                self._retired.setdefault(team_id, []).append(lease)
        self._active.clear()
        self._lease_count = 0
        self._seen.clear()

    async def _forget_team(self, team_id: str, now: float) -> None:
        for lease in list(self._active.get(team_id, {}).values()):
            await self._retire(lease, now)
