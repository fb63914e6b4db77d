"""FailoverCounters: Redis while it answers, the exact Postgres path while it does not.

In process, with Redis behind a fault proxy (so it can be made unreachable while keeping its
data) and an injected monotonic clock for the probe interval.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from proxy import FaultProxy
from replicas import redis_counters
from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    RateCharge,
    RateLimit,
    RateState,
    RateUnit,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
)
from server.storage.failover_counters import FailoverCounters
from server.storage.postgres import PostgresRecords
from server.storage.postgres_counters import PostgresCounters
from server.storage.redis_counters import RedisCounters
from server.windows import ALL_TIME

NOW = 1_700_000_000.0
LATER = NOW + 600
NEVER = Enforcement.NEVER_EXCEED


def scope(team: str) -> ScopeBudget:
    return ScopeBudget(ScopeKind.TEAM, team, 1000, "", ALL_TIME)


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


class CountingRedis(RedisCounters):
    """RedisCounters that counts its probes."""

    pings = 0

    async def ping(self) -> None:
        self.pings += 1
        await super().ping()


@dataclass
class Failover:
    store: FailoverCounters
    redis: CountingRedis
    proxy: FaultProxy
    clock: Clock
    redis_url: str


@pytest.fixture
async def failover(tmp_path: Path, database_url: str, redis_url: str) -> AsyncIterator[Failover]:
    records = PostgresRecords(database_url)
    await records.start()  # migrations (budget_holds)
    await records.close()
    parts = urlsplit(redis_url)
    assert parts.hostname is not None and parts.port is not None
    async with FaultProxy(parts.hostname, parts.port) as proxy:
        redis = CountingRedis(f"redis://{proxy.address}/0")
        clock = Clock()
        store = FailoverCounters(redis, PostgresCounters(database_url), clock=clock)
        await store.start()
        try:
            yield Failover(store, redis, proxy, clock, redis_url)
        finally:
            await store.close()


def outage(f: Failover) -> None:
    f.proxy.block()
    f.proxy.cut()


async def test_decides_on_postgres_while_redis_is_down_and_counts_the_switch(
    failover: Failover,
) -> None:
    f = failover
    switches: list[int] = []
    f.store.on_failover = lambda: switches.append(1)
    await f.store.init("a", [(scope("a"), 0)], NOW)
    on_redis = await f.store.reserve("a", [scope("a")], 10, "r1", LATER, NOW, NEVER)
    assert on_redis.states == (CounterState(0, 10),) and not f.store.failed_over

    outage(f)
    on_postgres = await f.store.reserve("a", [scope("a")], 990, "r2", LATER, NOW, NEVER)
    refused = await f.store.reserve("a", [scope("a")], 11, "r3", LATER, NOW, NEVER)

    assert f.store.failed_over and switches == [1]
    # Exact on its own: Postgres knows nothing of the Redis hold, only its own.
    assert on_postgres.status is ReserveStatus.RESERVED
    assert refused.status is ReserveStatus.DENIED
    assert await f.store.read("a", [scope("a")], NOW) == (CounterState(0, 990),)


async def test_rate_limits_pass_through_to_redis_then_to_postgres(failover: Failover) -> None:
    f = failover
    limit = RateLimit(ScopeKind.KEY, "k", RateUnit.REQUESTS, 1)
    tokens = RateLimit(ScopeKind.KEY, "k", RateUnit.TOKENS, 100)
    charges = [RateCharge(limit, 1), RateCharge(tokens, 60)]
    await f.store.init("a", [(scope("a"), 0)], NOW)

    def reserve(rid: str) -> Awaitable[ReserveResult]:
        return f.store.reserve("a", [scope("a")], 1, rid, LATER, NOW, NEVER, rates=charges)

    assert (await reserve("r1")).status is ReserveStatus.RESERVED
    assert (await reserve("r2")).status is ReserveStatus.RATE_LIMITED
    await f.store.settle("a", "r1", [scope("a")], 1, "q1", NOW, 60, rates=[RateCharge(tokens, -60)])
    on_redis = await f.redis.reserve(
        "a", [scope("a")], 0, "", LATER, NOW, NEVER, rates=[RateCharge(tokens, 0)]
    )
    assert on_redis.rates == (RateState(100, 100, 0.0),)  # corrected back down to empty

    outage(f)
    # Postgres keeps this replica's own limiters: they start empty on this side.
    on_postgres = await reserve("r3")
    assert f.store.failed_over
    assert (on_postgres.status, on_postgres.rates) == (
        ReserveStatus.RESERVED,
        (RateState(1, 0, 60.0), RateState(100, 40, 36.0)),
    )
    refused = await reserve("r4")
    assert (refused.status, refused.rate_index, refused.retry_after) == (
        ReserveStatus.RATE_LIMITED,
        0,
        60.0,
    )


async def test_probes_redis_at_most_once_a_second(failover: Failover) -> None:
    f = failover
    outage(f)
    for step in range(10):  # 10 calls over 0.9 s: the first probe is due at 1 s
        f.clock.now = step * 0.1
        await f.store.read("a", [scope("a")], NOW)
    assert f.redis.pings == 0 and f.store.failed_over
    for step in range(10, 30):  # 2 s more: two probes, both failing
        f.clock.now = step * 0.1
        await f.store.read("a", [scope("a")], NOW)
        await f.store.wait_for_probe()
    assert f.redis.pings == 2 and f.store.failed_over


async def test_on_return_forgets_exactly_the_teams_served_meanwhile(failover: Failover) -> None:
    f = failover
    for team in ("a", "b"):
        await f.store.init(team, [(scope(team), 100)], NOW)
    outage(f)
    await f.store.reserve("a", [scope("a")], 5, "r1", LATER, NOW, NEVER)  # served on Postgres

    f.proxy.unblock()
    f.clock.now = 1.0
    await f.store.read("a", [scope("a")], NOW)  # still on Postgres; starts the probe
    await f.store.wait_for_probe()
    after = await f.store.read("b", [scope("b")], NOW)

    assert not f.store.failed_over and f.redis.pings == 1
    assert after == (CounterState(100, 0),)  # untouched team: its counter is still good
    assert await f.store.read("a", [scope("a")], NOW) == (None,)  # rebuilt from the ledger
    assert set(await redis_counters(f.redis_url, "a")) == set()


async def test_starting_while_redis_is_down_starts_failed_over(database_url: str) -> None:
    store = FailoverCounters(RedisCounters("redis://127.0.0.1:1/0"), PostgresCounters(database_url))
    records = PostgresRecords(database_url)
    await records.start()
    await records.close()
    await store.start()
    try:
        assert store.failed_over
        assert await store.read("a", [scope("a")], NOW) == (CounterState(0, 0),)
    finally:
        await store.close()


async def test_with_postgres_down_too_redis_is_probed_at_once(
    failover: Failover, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = failover
    outage(f)
    await f.store.read("a", [scope("a")], NOW)  # fails over (Postgres still answers)

    async def down(*args: object, **kwargs: object) -> None:
        raise Unavailable("postgres unavailable: (test)")

    monkeypatch.setattr(f.store.postgres, "read", down)
    f.proxy.unblock()  # Redis is back, well before the probe interval is over
    with pytest.raises(Unavailable):
        await f.store.read("a", [scope("a")], NOW)
    await f.store.wait_for_probe()
    assert not f.store.failed_over and f.redis.pings == 1
