"""The keeping of a replica's leases: taking, retiring, releasing and sweeping them.

Split from server/storage/leasing.py (its docstring tells how leasing works) as LeaseBook,
the base class of LeasingCounters, whose __init__ sets (and explains) the attributes
declared here. Here is what keeps the leases, off the hot path: taking one (one request at
a time per scope set, only for a hot scope set, sized from the headroom last seen),
remembering the headroom store answers show, retiring a lease and releasing its hold once
its requests are done, sweeping requests whose holds expired, and forgetting every lease
when the store fails (_guard), and counting the decisions per second of each scope set
(_count, read by _hot; each lease shares its scope set's count, so the hot path counts
into Lease.rate itself within a second). The CounterStore methods and the hot path
(admit_from and what it calls: _take, fits) stay in leasing.py, on LeasingCounters itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
)
from server.storage.lease import (
    LEASE_FRACTION,
    MAX_LEASES,
    MIN_LEASE_REQUESTS,
    Lease,
    LeaseKey,
)
from server.storage.memory_counters import MAX_PARTIAL_RELEASE

T = TypeVar("T")


class LeaseBook:
    """The leases of a LeasingCounters; its __init__ sets the attributes declared here."""

    inner: CounterStore
    _seconds: float
    _hot_requests: int
    _active: dict[str, dict[LeaseKey, Lease]]
    _retired: dict[str, list[Lease]]
    _seen: dict[tuple[str, LeaseKey], tuple[CounterState, ...]]
    _rate: dict[tuple[str, LeaseKey], list[int]]
    _by_reservation: dict[str, Lease]
    _pending: dict[tuple[str, LeaseKey], asyncio.Future[Lease | None]]
    _prefix: str
    _serial: int
    _generation: int
    _lease_count: int
    _claimed: dict[str, list[str]]

    async def _lease_once(
        self,
        key: LeaseKey,
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

    def _keep_claimed(self, team_id: str, result: ReserveResult) -> None:
        """Keep the overdue settles a lease's own reserve claimed, for the caller to recover.

        The store hands them to whoever reserves next and pushes their deadline on, so a
        lease taken on a request's behalf must not drop them: LeasingCounters.reserve passes
        them on to its caller, who settles them from the ledger (server.settling).
        """
        if result.unsettled:
            self._claimed.setdefault(team_id, []).extend(result.unsettled)

    async def _new_lease(
        self,
        key: LeaseKey,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        amount: int,
        hold_expires_at: float,
        now: float,
    ) -> Lease | None:
        """A lease cut from the headroom seen last time, or None (too little, or unknown)."""
        generation = self._generation
        which = (team_id, key)
        seen = self._seen.get(which)
        if seen is None or not self._hot(which, now):
            return None  # first sight (a plain reservation tells the headroom), or quiet
        rate = self._count(which, now, 0)  # its list, for the lease to count into
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
            self._keep_claimed(team_id, result)
            if result.status is not ReserveStatus.RESERVED:
                self._observe(key, team_id, result)
                return None
            lease = Lease(team_id, "", None, until, result.states, which=which, rate=rate)
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
            self._keep_claimed(team_id, result)
            if result.status is not ReserveStatus.RESERVED:
                self._observe(key, team_id, result)
                return None
            lease = Lease(team_id, lease_id, size, until, result.states, which=which, rate=rate)
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

    def _hot(self, which: tuple[str, LeaseKey], now: float) -> bool:
        last, count, before = self._rate.get(which, (0, 0, 0))
        if last != int(now):
            return False
        return max(count, before) >= self._hot_requests

    def _count(self, which: tuple[str, LeaseKey], now: float, decisions: int = 1) -> list[int]:
        """Count ``decisions`` for the scope set ``which`` in the second of ``now``; its
        rate list (what Lease.rate shares). The hot path counts into a lease's list itself
        while the second is the same."""
        second = int(now)
        rate = self._rate.get(which)
        if rate is not None and rate[0] == second:
            rate[1] += decisions
            return rate
        if rate is None:
            rate = [second, decisions, 0]
        else:
            # A new second: the entry moves to the recent end of the eviction order.
            del self._rate[which]
            rate[2] = rate[1] if rate[0] == second - 1 else 0
            rate[0], rate[1] = second, decisions
        self._rate[which] = rate
        if len(self._rate) > MAX_LEASES:
            # The least recently used. A lease still pointing at its list counts into it
            # until its next new second, which links it to a fresh one.
            del self._rate[next(iter(self._rate))]
        return rate

    def _observe(self, key: LeaseKey, team_id: str, result: ReserveResult) -> None:
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
