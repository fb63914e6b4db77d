"""Quota leasing (server/storage/leasing.py) over the in-process store and real Redis: local
admissions hold nothing new, the lease is an ordinary hold, and no lease ever lets spend
past what the store itself would admit."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest

from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    RateCharge,
    RateLimit,
    RateUnit,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
    SettleResult,
)
from server.storage.lease import HOT_REQUESTS, LEASE_FRACTION, lease_key
from server.storage.leasing import LeasingCounters
from server.storage.memory_counters import MemoryCounters
from server.storage.redis_counters import RedisCounters
from server.windows import ALL_TIME

NOW = 1_700_000_000.0
TTL = 60.0
NEVER = Enforcement.NEVER_EXCEED
CROSS = Enforcement.CROSS_ONCE


@pytest.fixture(params=["memory", "redis"])
def inner_url(request: pytest.FixtureRequest) -> str:
    """ "" for the in-process store, else a Redis URL (a sync fixture: it may start Redis)."""
    return "" if request.param == "memory" else str(request.getfixturevalue("redis_url"))


@pytest.fixture
async def inner(inner_url: str) -> AsyncIterator[CounterStore]:
    store: CounterStore
    if not inner_url:
        store = MemoryCounters()
    else:
        store = RedisCounters(inner_url, prefix=secrets.token_hex(4))
    await store.start()
    yield store
    await store.close()


def scopes(limit: int | None) -> list[ScopeBudget]:
    return [
        ScopeBudget(ScopeKind.KEY, "k", None, "", ALL_TIME),
        ScopeBudget(ScopeKind.TEAM, "t", limit, "", ALL_TIME),
    ]


async def ready(store: CounterStore, limit: int | None) -> list[ScopeBudget]:
    found = scopes(limit)
    await store.init("t", [(s, 0) for s in found], NOW)
    return found


async def test_after_the_first_request_decisions_come_from_the_lease(inner: CounterStore) -> None:
    leasing = LeasingCounters(inner, lease_seconds=5.0, hot_requests=1)
    found = await ready(inner, 16_000_000)
    first = await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    assert first.status is ReserveStatus.RESERVED and leasing.local_admits == 0
    for i in range(1, 50):
        result = await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER)
        assert result.status is ReserveStatus.RESERVED
    assert leasing.local_admits == 49
    # The store holds the plain first request and one lease: 1/16 of the headroom it saw.
    held = (await inner.read("t", found, NOW))[1]
    assert held == CounterState(0, 1000 + (16_000_000 - 1000) // LEASE_FRACTION)


async def test_settling_a_leased_request_gives_its_part_of_the_hold_back(
    inner: CounterStore,
) -> None:
    leasing = LeasingCounters(inner, lease_seconds=5.0, hot_requests=1)
    found = await ready(inner, 16_000_000)
    await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    await leasing.reserve("t", found, 1000, "r1", NOW + TTL, NOW, NEVER)  # from the lease
    before = (await inner.read("t", found, NOW))[1]
    assert before is not None
    settled = await leasing.settle("t", "r1", found, 600, "q1", NOW, 3600)
    assert settled.applied
    after = (await inner.read("t", found, NOW))[1]
    assert after == CounterState(600, before.held - 1000)
    # A retry changes nothing more.
    await leasing.settle("t", "r1", found, 600, "q1", NOW, 3600)
    assert (await inner.read("t", found, NOW))[1] == after


async def test_a_retired_lease_is_released_once_its_requests_are_done(inner: CounterStore) -> None:
    leasing = LeasingCounters(inner, lease_seconds=1.0, hot_requests=1)
    found = await ready(inner, 16_000_000)
    await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    await leasing.settle("t", "r0", found, 1000, "q0", NOW, 3600)
    await leasing.reserve("t", found, 1000, "r1", NOW + TTL, NOW, NEVER)  # takes a lease
    later = NOW + 2  # the lease's time is up: this request retires it and is decided anew
    await leasing.reserve("t", found, 1000, "r2", later + TTL, later, NEVER)
    held = (await inner.read("t", found, later))[1]
    assert held is not None and held.held >= 1000  # r1 is still out: its lease still holds
    await leasing.settle("t", "r1", found, 1000, "q1", later, 3600)
    await leasing.settle("t", "r2", found, 1000, "q2", later, 3600)
    await leasing.release("t", "none", later)
    # r2 was decided from a new lease (fresh headroom): its room is still held; the old
    # lease, whose last request settled, is gone.
    state = (await inner.read("t", found, later))[1]
    assert state is not None and state.spend == 3000
    fresh = (16_000_000 - 3000) // LEASE_FRACTION
    assert state.held in (0, fresh - 1000, fresh)


async def test_near_the_limit_every_decision_is_the_stores(inner: CounterStore) -> None:
    leasing = LeasingCounters(inner, lease_seconds=5.0, hot_requests=1)
    found = await ready(inner, 10_000)  # 1/16 of it is less than 8 requests of 1000
    answers = [
        await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER) for i in range(12)
    ]
    assert [a.status for a in answers].count(ReserveStatus.RESERVED) == 10
    assert answers[-1].status is ReserveStatus.DENIED
    assert leasing.local_admits == 0


async def test_rate_limited_requests_bypass_leases(inner: CounterStore) -> None:
    leasing = LeasingCounters(inner, lease_seconds=5.0, hot_requests=1)
    found = await ready(inner, 16_000_000)
    rpm = [RateCharge(RateLimit(ScopeKind.KEY, "k", RateUnit.REQUESTS, 2), 1)]
    answers = [
        await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER, rates=rpm)
        for i in range(3)
    ]
    assert [a.status for a in answers] == [
        ReserveStatus.RESERVED,
        ReserveStatus.RESERVED,
        ReserveStatus.RATE_LIMITED,
    ]
    assert leasing.local_admits == 0


@pytest.mark.parametrize("mode", [NEVER, CROSS])
async def test_replicas_with_leases_never_overspend(mode: Enforcement, redis_url: str) -> None:
    """Four leasing replicas over one Redis, estimates >= costs: the rule's bound holds."""
    prefix = secrets.token_hex(4)
    stores = [RedisCounters(redis_url, prefix=prefix) for _ in range(4)]
    for store in stores:
        await store.start()
    replicas = [LeasingCounters(store, lease_seconds=0.5, hot_requests=1) for store in stores]
    limit, estimate = 5_000_000, 10_000
    found = await ready(stores[0], limit)
    spent = 0
    serial = 0

    async def request(replica: LeasingCounters, at: float) -> None:
        nonlocal spent, serial
        serial += 1
        mine = serial
        rid = f"r{mine}"
        result = await replica.reserve("t", found, estimate, rid, at + TTL, at, mode)
        if result.status is ReserveStatus.RESERVED:
            cost = estimate * (mine % 7 + 3) // 10  # 30%..90% of the estimate
            await asyncio.sleep(0)
            await replica.settle("t", rid, found, cost, f"q{mine}", at, 3600)
            spent += cost

    try:
        for step in range(60):
            at = NOW + step * 0.1
            await asyncio.gather(*(request(replicas[i % 4], at) for i in range(64)))
        state = (await stores[0].read("t", found, NOW + 10))[1]
        assert state is not None and state.spend == spent
        if mode is NEVER:
            assert spent <= limit
        else:
            assert spent < limit + estimate
        assert spent >= limit * 8 // 10, spent  # leases did not strand the headroom
        assert sum(r.local_admits for r in replicas) > 0
    finally:
        for replica in replicas:
            await replica.close()


class Flaky(MemoryCounters):
    """The in-process store, made to fail like a Redis that went away, or to fail over."""

    down = False
    failed_over = False

    async def settle(self, *args: Any, **kwargs: Any) -> SettleResult:
        if self.down:
            raise Unavailable("redis unavailable: (test)")
        return await super().settle(*args, **kwargs)


async def test_a_store_failure_stops_every_lease_at_once() -> None:
    store = Flaky()
    leasing = LeasingCounters(store, lease_seconds=60.0, hot_requests=1)
    found = await ready(store, 16_000_000)
    for i in range(3):
        await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER)
    assert leasing.local_admits == 2
    store.down = True
    with pytest.raises(Unavailable):
        await leasing.settle("t", "r1", found, 500, "q1", NOW, 3600)
    # No more decisions from the lease: the next one is the store's (which answers).
    await leasing.reserve("t", found, 1000, "r3", NOW + TTL, NOW, NEVER)
    assert leasing.local_admits == 2
    store.down = False
    # The failed settle is still outstanding and can be retried.
    assert (await leasing.settle("t", "r1", found, 500, "q1", NOW, 3600)).applied


async def test_a_kept_lease_handle_admits_nothing_once_the_lease_is_gone() -> None:
    # The hot path keeps the handle lease_for gives; every way a lease ends must stop it.
    store = Flaky()
    leasing = LeasingCounters(store, lease_seconds=60.0, hot_requests=1)
    found = await ready(store, 16_000_000)
    key = lease_key(found, NEVER)
    await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    await leasing.reserve("t", found, 1000, "r1", NOW + TTL, NOW, NEVER)
    lease = leasing.lease_for("t", key)
    assert lease is not None
    assert leasing.admit_from(lease, 1000, "h1", NOW + TTL, NOW) is not None
    assert leasing.admit_from(lease, -1, "h2", NOW + TTL, NOW) is None  # no negative holds
    assert leasing.admit_from(lease, 1000, "h3", NOW + TTL, NOW + 60.0) is None  # time is up

    store.failed_over = True  # deciding on Postgres: no lease is spent from
    assert leasing.admit_from(lease, 1000, "h4", NOW + TTL, NOW) is None
    store.failed_over = False
    store.down = True  # the store failed: every lease retires at once
    with pytest.raises(Unavailable):
        await leasing.settle("t", "h1", found, 1000, "q1", NOW, 3600)
    store.down = False
    assert leasing.lease_for("t", key) is None
    assert leasing.admit_from(lease, 1000, "h5", NOW + TTL, NOW) is None  # retired for good
    admitted = leasing.local_admits
    for rid in ("r2", "r3"):  # the store's answer first (fresh headroom), then a new lease
        await leasing.reserve("t", found, 1000, rid, NOW + TTL, NOW, NEVER)
    fresh = leasing.lease_for("t", key)
    assert fresh is not None and fresh is not lease
    assert leasing.admit_from(lease, 1000, "h7", NOW + TTL, NOW) is None
    assert leasing.admit_from(fresh, 1000, "h8", NOW + TTL, NOW) is not None
    assert leasing.local_admits == admitted + 2  # r3 and h8


async def test_decisions_admitted_from_a_kept_handle_keep_the_scope_set_hot(
    inner: CounterStore,
) -> None:
    # The hot path admits through admit_from only; those decisions count towards the scope
    # set's rate like any other, so when its lease's time is up a new one is taken.
    leasing = LeasingCounters(inner, lease_seconds=2.0)  # the default: hot keys only
    found = await ready(inner, 16_000_000)
    for i in range(HOT_REQUESTS + 1):  # hot in the first second: the store, then a lease
        await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER)
    lease = leasing.lease_for("t", lease_key(found, NEVER))
    assert lease is not None
    later = NOW + 1.5
    for i in range(HOT_REQUESTS):  # the next second: from the handle alone
        assert leasing.admit_from(lease, 1000, f"h{i}", later + TTL, later) is not None
    admitted = leasing.local_admits
    end = NOW + 2.5  # the lease's time is up; the second before was a hot one
    for rid in ("e1", "e2"):  # the store's answer first (fresh headroom), then a new lease
        await leasing.reserve("t", found, 1000, rid, end + TTL, end, NEVER)
    fresh = leasing.lease_for("t", lease_key(found, NEVER))
    assert fresh is not None and fresh is not lease
    assert leasing.local_admits == admitted + 1


async def test_failing_over_to_postgres_forgets_the_leases() -> None:
    store = Flaky()
    leasing = LeasingCounters(store, lease_seconds=60.0, hot_requests=1)
    found = await ready(store, 16_000_000)
    await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    await leasing.reserve("t", found, 1000, "r1", NOW + TTL, NOW, NEVER)
    assert leasing.local_admits == 1
    store.failed_over = True
    await leasing.reserve("t", found, 1000, "r2", NOW + TTL, NOW, NEVER)
    store.failed_over = False  # back on Redis: the old lease is not trusted again
    await leasing.reserve("t", found, 1000, "r3", NOW + TTL, NOW, NEVER)
    assert leasing.local_admits == 1


async def test_quiet_keys_get_no_lease_so_an_idle_key_holds_nothing(inner: CounterStore) -> None:
    leasing = LeasingCounters(inner, lease_seconds=1.0)  # the default: hot keys only
    found = await ready(inner, 16_000_000)
    for i in range(HOT_REQUESTS - 1):  # a quiet key: every decision is the store's
        await leasing.reserve("t", found, 0, "", NOW + TTL, NOW + i * 0.01, NEVER)
    assert leasing.local_admits == 0
    hot = NOW + 0.5
    for i in range(10):  # the same second, now hot: a lease, and decisions from it
        await leasing.reserve("t", found, 1000, f"h{i}", hot + TTL, hot, NEVER)
    assert leasing.local_admits == 10
    for i in range(10):
        await leasing.settle("t", f"h{i}", found, 1000, f"q{i}", hot, 3600)
    # Later, a trickle of probes: the lease's time is up, it is given back, and no new one
    # is taken for a key this quiet, so nothing stays held.
    for step in range(5):
        await leasing.reserve("t", found, 0, "", NOW + 3 + step + TTL, NOW + 3 + step, NEVER)
    assert (await inner.read("t", found, NOW + 8))[1] == CounterState(10_000, 0)


async def test_too_many_leased_requests_out_go_to_the_store_without_new_leases(
    inner: CounterStore,
) -> None:
    # Checks nobody settles (a gateway that never reports back) pile up: past the bound,
    # each request is a plain hold in the store, and no lease is taken per request (each
    # would hold a slice of the headroom, and the budget would soon deny everyone).
    leasing = LeasingCounters(inner, lease_seconds=60.0, hot_requests=1, max_outstanding=20)
    limit = 16_000_000
    found = await ready(inner, limit)
    for i in range(200):
        result = await leasing.reserve("t", found, 1000, f"r{i}", NOW + TTL, NOW, NEVER)
        assert result.status is ReserveStatus.RESERVED, i
    assert leasing.local_admits == 20
    # The first request plainly, one lease, and the 179 past the bound plainly.
    held = 1000 + (limit - 1000) // LEASE_FRACTION + 179 * 1000
    assert (await inner.read("t", found, NOW))[1] == CounterState(0, held)


async def test_overdue_settles_claimed_by_a_lease_reserve_reach_the_caller(
    inner: CounterStore,
) -> None:
    # A RecordSpend announced its settle and its replica died before settling. The next
    # reserve of the team claims it (and pushes its deadline on) for its caller to recover
    # from the ledger, also when that reserve is the one that takes a lease: dropping the
    # claim there left the counters short of the ledger until the claim ran out.
    leasing = LeasingCounters(inner, lease_seconds=5.0, hot_requests=1)
    found = await ready(inner, 16_000_000)
    await leasing.begin_settle("t", found, "dead-request", NOW, 1.0)
    first = await leasing.reserve("t", found, 1000, "r0", NOW + TTL, NOW, NEVER)
    assert first.status is ReserveStatus.RESERVED and first.unsettled == ()  # not yet due
    later = NOW + 2.0
    second = await leasing.reserve("t", found, 1000, "r1", later + TTL, later, NEVER)
    assert second.status is ReserveStatus.RESERVED
    assert leasing.local_admits == 1  # admitted from the lease its reserve just took
    assert second.unsettled == ("dead-request",)
    third = await leasing.reserve("t", found, 1000, "r2", later + TTL, later, NEVER)
    assert third.unsettled == ()  # handed over once
