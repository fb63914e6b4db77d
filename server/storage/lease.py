"""The lease value of quota leasing: what one lease is, its identity and its bounds.

Split from server/storage/leasing.py (its docstring tells how leasing works). Here the plain
values, with no store and nothing to await: the constants that size and bound leases
(LEASE_FRACTION, MIN_LEASE_REQUESTS, MAX_LEASES, HOT_REQUESTS, MAX_OUTSTANDING), a scope
set's identity (LeaseKey, lease_key), the Lease dataclass, and fits (may a request be
admitted from a lease now, its room included; leasing's _fits before the split). leasing.py
and lease_book.py import them at module level, so the hot path finds fits with a plain
global lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.rules import Enforcement
from server.storage.base import CounterState, ScopeBudget

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


@dataclass(slots=True)
class Lease:
    """One lease: a hold in the store that this replica admits requests from.

    Outside the leasing modules (this one, leasing.py and lease_book.py) it is an opaque
    handle (see :meth:`LeasingCounters.lease_for`).
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
    # Decisions per second of that scope set: [second, count in it, count in the second
    # before], the very list LeasingCounters keeps for it. The hot path counts into it
    # without hashing the scope set (a nested tuple, whose hash is not cached) per request.
    rate: list[int] = field(default_factory=lambda: [0, 0, 0])


def fits(lease: Lease, amount: int, now: float) -> bool:
    """May a request estimated at ``amount`` be admitted from ``lease`` now?"""
    if now >= lease.admit_until or lease.retired:
        return False
    if lease.granted is None:
        return True
    room = lease.granted - lease.consumed
    return room > 0 and amount <= room


def lease_key(scopes: Sequence[ScopeBudget], mode: Enforcement) -> LeaseKey:
    """The identity of a scope set's lease: the enforcement rule and each counter's id and
    limit (a new window or a changed limit is another scope set)."""
    return (mode.value, tuple((s.counter_id, s.limit_nanos) for s in scopes))
