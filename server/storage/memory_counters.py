"""In-process counters for the embedded single-instance default.

Every method runs to completion without awaiting, and asyncio runs one coroutine at a time,
so each call is one atomic step, like one Lua script in Redis: no locks are needed. Rate
limits live beside the counters, in :class:`~server.storage.memory_limiters.RateLimiters`.

This module also holds the retention rules both counter stores share (how long a counter and
a dedupe marker live, how many expired holds one call releases), so the Redis store cannot
drift from this one.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.rules import Enforcement, admits
from server.storage.base import (
    CounterState,
    RateCharge,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    SettleResult,
)
from server.storage.memory_limiters import RateLimiters, check_rates, now_ms
from server.storage.snapshots import visible
from server.windows import Window

# Expired holds released per call, at most: bounds the work of one decision.
PURGE_LIMIT = 100
# Seconds an overdue settle handed to one caller for recovery is not handed to another.
RECOVERY_CLAIM_SECONDS = 30
# A finished window's counter is kept this long at least, so late RecordSpends of requests
# admitted in it still find their counter (otherwise they are only in the ledger).
MIN_GRACE_SECONDS = 3600
# Redis counts in signed 64-bit integers; both stores refuse amounts it could not hold.
MAX_NANOS = 2**63 - 1
# A hold released in parts (a lease) stays below this, so the Lua arithmetic on it is exact.
MAX_PARTIAL_RELEASE = 2**53
# Entries of each expiry heap reclaimed per call: more than one call can create, so memory
# stays bounded while no call pays for a large backlog at once.
_SWEEP_LIMIT = 256


def counter_ttl(window: Window, now: float) -> int | None:
    """Whole seconds a counter created at ``now`` lives: to its window's end plus a grace.

    The grace is the window's length, but at least an hour. None for an all-time window.
    """
    if window.end is None:
        return None
    grace = max(MIN_GRACE_SECONDS, window.end - window.start)
    return max(1, math.ceil(window.end + grace - now))


def dedupe_seconds(dedupe_ttl: float) -> int:
    """The dedupe marker's lifetime in whole seconds (at least one)."""
    if not math.isfinite(dedupe_ttl):
        raise ValueError(f"dedupe_ttl must be finite, got {dedupe_ttl!r}")
    return max(1, math.ceil(dedupe_ttl))


def check_nanos(name: str, value: int) -> None:
    """Refuse a negative amount, or one a 64-bit counter cannot hold."""
    if not 0 <= value <= MAX_NANOS:
        raise ValueError(f"{name} must be between 0 and {MAX_NANOS} nano-USD, got {value}")


def check_scopes(scopes: Sequence[ScopeBudget]) -> None:
    """Refuse negative limits: ``None`` is the only way to say unlimited."""
    for scope in scopes:
        if scope.limit_nanos is not None:
            check_nanos(f"limit of {scope.counter_id}", scope.limit_nanos)


@dataclass(slots=True)
class _Counter:
    spend: int
    held: int
    expires_at: float | None
    snapshot: str | None = None  # the ledger snapshot its spend was summed in

    def state(self) -> CounterState:
        return CounterState(self.spend, self.held)


@dataclass(slots=True)
class _Hold:
    amount: int
    counter_ids: tuple[str, ...]
    expires_at: float


@dataclass(slots=True)
class _TeamHolds:
    by_id: dict[str, _Hold] = field(default_factory=dict)
    # Min-heap of (expires_at, reservation_id): the order Redis's zset gives (score, then
    # member). Settled holds leave stale entries, skipped when popped.
    by_expiry: list[tuple[float, str]] = field(default_factory=list)


class MemoryCounters:
    """A :class:`~server.storage.base.CounterStore` in plain dicts, for one process."""

    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], _Counter] = {}
        self._holds: dict[str, _TeamHolds] = {}
        self._done: dict[tuple[str, str], float] = {}  # (team, request id) -> expires_at
        # Costs settled while their counter was missing: (team, counter id) ->
        # (expires_at, {xact: cost}), taken in by the init that recreates the counter.
        self._parked: dict[tuple[str, str], tuple[float, dict[int, int]]] = {}
        # Settles announced by begin_settle and not done yet: team -> {request id: deadline}.
        self._inflight: dict[str, dict[str, float]] = {}
        # Min-heaps of (expires_at, team, id) to reclaim memory; may hold stale entries.
        self._counter_expiry: list[tuple[float, str, str]] = []
        self._done_expiry: list[tuple[float, str, str]] = []
        self._limiters = RateLimiters()

    async def start(self) -> None:
        """Nothing to connect."""

    async def close(self) -> None:
        """Nothing to release."""

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
        """Check every scope with the rule, then every rate limit; only if all admit, hold
        ``amount`` on each scope and charge each limit.

        Expired holds are released first; an earlier hold under the same ``reservation_id``
        is replaced, not added to (its rate charges are not: a retried check counts again).
        With ``amount`` 0 nothing is held.
        """
        check_nanos("amount", amount)
        check_scopes(scopes)
        check_rates(rates, at_reserve=True)
        if amount > 0 and not reservation_id:
            raise ValueError("a hold needs a reservation_id")
        self._sweep(now)
        self._purge(team_id, now)
        unsettled = self._claim_unsettled(team_id, now)
        if reservation_id:
            self._drop_hold(team_id, reservation_id, now)

        found = [self._counter(team_id, scope.counter_id, now) for scope in scopes]
        counters = [counter for counter in found if counter is not None]
        if len(counters) < len(found):
            missing = tuple(i for i, counter in enumerate(found) if counter is None)
            return ReserveResult(ReserveStatus.MISSING, missing=missing, unsettled=unsettled)

        for index, (scope, counter) in enumerate(zip(scopes, counters, strict=True)):
            if not admits(mode, scope.limit_nanos, counter.spend, counter.held, amount):
                return ReserveResult(
                    ReserveStatus.DENIED,
                    states=tuple(c.state() for c in counters),
                    denied_index=index,
                    unsettled=unsettled,
                )
        decision = self._limiters.reserve(team_id, rates, now, mode)
        if not decision.admitted:
            return ReserveResult(
                ReserveStatus.RATE_LIMITED,
                states=tuple(c.state() for c in counters),
                rates=decision.states,
                rate_index=decision.refused,
                retry_after=decision.retry_after,
                unsettled=unsettled,
            )

        if amount > 0:
            for counter in counters:
                counter.held += amount
            ids = tuple(scope.counter_id for scope in scopes)
            holds = self._holds.setdefault(team_id, _TeamHolds())
            holds.by_id[reservation_id] = _Hold(amount, ids, hold_expires_at)
            heapq.heappush(holds.by_expiry, (hold_expires_at, reservation_id))
        states = tuple(c.state() for c in counters)
        return ReserveResult(
            ReserveStatus.RESERVED, states=states, rates=decision.states, unsettled=unsettled
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
        """Create missing counters with the given ledger spend; existing ones are left alone.

        A new counter also takes in the costs parked while it was missing whose ledger rows
        its snapshot did not see. Nothing here invalidates counters under traffic, so the
        epoch never changes.
        """
        for _scope, spend in counters:
            check_nanos("spend", spend)
        self._sweep(now)
        for index, (scope, ledger_spend) in enumerate(counters):
            if self._counter(team_id, scope.counter_id, now) is not None:
                continue
            snapshot = snapshots[index] if index < len(snapshots) else None
            expires, parked = self._parked.pop((team_id, scope.counter_id), (now, {}))
            unseen = [cost for xact, cost in parked.items() if not visible(xact, snapshot)]
            spend = ledger_spend + (sum(unseen) if expires > now else 0)
            ttl = counter_ttl(scope.window, now)
            expires_at = None if ttl is None else now + ttl
            self._counters[(team_id, scope.counter_id)] = _Counter(spend, 0, expires_at, snapshot)
            if expires_at is not None:
                heapq.heappush(self._counter_expiry, (expires_at, team_id, scope.counter_id))
        return True

    async def team_epoch(self, team_id: str) -> str:
        """Always "": counters are only ever lost all at once, with the process."""
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
        """Release the reservation's hold (if any), add ``cost`` to each existing counter and
        apply the token corrections ``rates`` to their limiters.

        Applied once per ``request_id`` within ``dedupe_ttl`` seconds; a repeat changes
        nothing and returns ``applied=False`` with the current counters. A counter whose
        snapshot sees ``xact`` is not added to; for a missing one the cost is parked.
        """
        check_nanos("cost", cost)
        check_rates(rates, at_reserve=False)
        if not request_id:
            raise ValueError("settle needs a request_id")
        marker_seconds = dedupe_seconds(dedupe_ttl)
        self._sweep(now)
        self._purge(team_id, now)
        self._inflight.get(team_id, {}).pop(request_id, None)
        unsettled = self._claim_unsettled(team_id, now)
        done_key = (team_id, request_id)
        done_until = self._done.get(done_key)
        if done_until is not None and now < done_until:
            return SettleResult(False, self._states(team_id, scopes, now), unsettled)

        self._done[done_key] = now + marker_seconds
        heapq.heappush(self._done_expiry, (now + marker_seconds, team_id, request_id))
        if reservation_id and release_amount is not None:
            self._shrink_hold(team_id, reservation_id, release_amount, now)
        elif reservation_id:
            self._drop_hold(team_id, reservation_id, now)
        for scope in scopes:
            counter = self._counter(team_id, scope.counter_id, now)
            if counter is not None:
                if not visible(xact, counter.snapshot):
                    counter.spend += cost
            elif xact is not None:
                self._park(team_id, scope.counter_id, xact, cost, now + marker_seconds)
        self._limiters.correct(team_id, rates, now)
        return SettleResult(True, self._states(team_id, scopes, now), unsettled)

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        """``read``, and journal ``request_id`` until its settle."""
        if not request_id:
            raise ValueError("begin_settle needs a request_id")
        self._sweep(now)
        self._inflight.setdefault(team_id, {})[request_id] = now + grace
        return self._states(team_id, scopes, now)

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        """Forget an announced request that never reached the ledger."""
        pending = self._inflight.get(team_id)
        if pending is not None:
            pending.pop(request_id, None)
            if not pending:
                del self._inflight[team_id]

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters, None where missing.

        Like the Redis store, this does not release expired holds: ``held`` may include
        holds that expired since the team's last reserve, settle or release.
        """
        self._sweep(now)
        return self._states(team_id, scopes, now)

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold without spending; False when there was none (or it had expired)."""
        self._sweep(now)
        self._purge(team_id, now)
        return self._drop_hold(team_id, reservation_id, now)

    # -- internals -------------------------------------------------------------------------

    def _counter(self, team_id: str, counter_id: str, now: float) -> _Counter | None:
        """A live counter; one past its expiry is dropped here, as Redis's TTL would."""
        key = (team_id, counter_id)
        counter = self._counters.get(key)
        if counter is not None and counter.expires_at is not None and now >= counter.expires_at:
            del self._counters[key]
            return None
        return counter

    def _states(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        counters = (self._counter(team_id, scope.counter_id, now) for scope in scopes)
        return tuple(None if c is None else c.state() for c in counters)

    def _claim_unsettled(self, team_id: str, now: float) -> tuple[str, ...]:
        """Overdue announced settles (PURGE_LIMIT at most), each claimed for a while."""
        pending = self._inflight.get(team_id)
        if not pending:
            return ()
        due = sorted((deadline, rid) for rid, deadline in pending.items() if deadline <= now)
        claimed = tuple(rid for _, rid in due[:PURGE_LIMIT])
        for rid in claimed:
            pending[rid] = now + RECOVERY_CLAIM_SECONDS
        return claimed

    def _park(self, team_id: str, counter_id: str, xact: int, cost: int, until: float) -> None:
        """Keep a cost for the init that recreates a missing counter (until ``until``)."""
        _, parked = self._parked.get((team_id, counter_id), (until, {}))
        parked[xact] = cost
        self._parked[(team_id, counter_id)] = (until, parked)

    def _drop_hold(self, team_id: str, reservation_id: str, now: float) -> bool:
        holds = self._holds.get(team_id)
        hold = None if holds is None else holds.by_id.pop(reservation_id, None)
        if holds is None or hold is None:
            return False
        for counter_id in hold.counter_ids:
            counter = self._counter(team_id, counter_id, now)
            if counter is not None:
                # Below zero only when the counter was rebuilt under an older hold; clamp as
                # the Lua does.
                counter.held = max(0, counter.held - hold.amount)
        if not holds.by_id:
            # Every heap entry left is stale: drop the team's holds entirely.
            del self._holds[team_id]
        return True

    def _shrink_hold(self, team_id: str, reservation_id: str, amount: int, now: float) -> None:
        """Take ``amount`` off a hold (all of it when less is left)."""
        holds = self._holds.get(team_id)
        hold = None if holds is None else holds.by_id.get(reservation_id)
        if hold is None:
            return
        if amount >= hold.amount:
            self._drop_hold(team_id, reservation_id, now)
            return
        hold.amount -= amount
        for counter_id in hold.counter_ids:
            counter = self._counter(team_id, counter_id, now)
            if counter is not None:
                counter.held = max(0, counter.held - amount)

    def _purge(self, team_id: str, now: float) -> None:
        """Release holds that expired at or before ``now``, oldest first, PURGE_LIMIT at most."""
        holds = self._holds.get(team_id)
        released = 0
        while holds is not None and holds.by_expiry and released < PURGE_LIMIT:
            expires_at, reservation_id = holds.by_expiry[0]
            if expires_at > now:
                break
            heapq.heappop(holds.by_expiry)
            hold = holds.by_id.get(reservation_id)
            if hold is not None and hold.expires_at == expires_at:
                self._drop_hold(team_id, reservation_id, now)
                released += 1
            holds = self._holds.get(team_id)

    def _sweep(self, now: float) -> None:
        """Reclaim memory of counters, dedupe markers and rate limiters past their expiry.

        Lookups already treat them as gone; this only keeps memory bounded.
        """
        self._limiters.sweep(now_ms(now))
        for _ in range(_SWEEP_LIMIT):
            if not self._counter_expiry or self._counter_expiry[0][0] > now:
                break
            _, team_id, counter_id = heapq.heappop(self._counter_expiry)
            self._counter(team_id, counter_id, now)
        for _ in range(_SWEEP_LIMIT):
            if not self._done_expiry or self._done_expiry[0][0] > now:
                break
            _, team_id, request_id = heapq.heappop(self._done_expiry)
            done_until = self._done.get((team_id, request_id))
            if done_until is not None and now >= done_until:
                del self._done[(team_id, request_id)]
