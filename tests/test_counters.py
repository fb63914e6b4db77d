"""The CounterStore contract, run against the in-process store and a real Redis.

Rate limits (rpm, tpm) also run against PostgresCounters, whose limiters are in process.

Redis: the session's throwaway redis-server (or ``BUDGETD_TEST_REDIS_URL``, see conftest). Each
test also gets a random key prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from server.errors import Unavailable
from server.ratelimit import MAX_CHARGE, MAX_LEVEL, MAX_PER_MINUTE, WINDOW_MS
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    LedgerEntry,
    RateCharge,
    RateLimit,
    RateState,
    RateUnit,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
)
from server.storage.memory_counters import MemoryCounters
from server.storage.postgres import PostgresRecords
from server.storage.postgres_counters import PostgresCounters
from server.storage.redis_counters import RedisCounters
from server.storage.snapshots import snapshot_of, visible
from server.windows import ALL_TIME, Window

HOUR_END = 1_700_002_800
HOUR = Window(HOUR_END - 3600, HOUR_END)
NEXT_HOUR = Window(1_700_002_800, 1_700_006_400)
NOW = HOUR.start + 100.0
LATER = NOW + 600  # hold expiry used where expiry is not the point
TEAM = "team-a"
NEVER = Enforcement.NEVER_EXCEED
CROSS = Enforcement.CROSS_ONCE


def team_scope(limit: int | None, window: Window = HOUR) -> ScopeBudget:
    return ScopeBudget(ScopeKind.TEAM, TEAM, limit, "1h", window)


def key_scope(limit: int | None, window: Window = HOUR) -> ScopeBudget:
    return ScopeBudget(ScopeKind.KEY, "key-1", limit, "1h", window)


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the test Redis, for poking at it from outside the store."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def redis_counters(redis_url: str) -> AsyncIterator[RedisCounters]:
    """A started RedisCounters under a random prefix; its keys are deleted afterwards."""
    prefix = f"bdtest-{secrets.token_hex(6)}"
    store = RedisCounters(redis_url, prefix=prefix)
    await store.start()
    try:
        yield store
    finally:
        await store.close()
        async with Redis.from_url(redis_url) as client:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
            if keys:
                await client.delete(*keys)


@pytest.fixture
async def redis_cluster_counters(redis_cluster_url: str) -> AsyncIterator[RedisCounters]:
    """A started RedisCounters on the session's 3-master cluster (flushed per test)."""
    store = RedisCounters(redis_cluster_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "redis", "redis_cluster"])
def store(request: pytest.FixtureRequest) -> CounterStore:
    """Each contract test runs once per implementation (and on a Redis Cluster)."""
    if request.param == "memory":
        return MemoryCounters()
    fixture = "redis_counters" if request.param == "redis" else "redis_cluster_counters"
    redis_store: RedisCounters = request.getfixturevalue(fixture)
    return redis_store


async def reserve(
    store: CounterStore,
    scopes: list[ScopeBudget],
    amount: int,
    rid: str,
    *,
    mode: Enforcement = NEVER,
    now: float = NOW,
    expires: float = LATER,
) -> tuple[ReserveStatus, tuple[CounterState, ...], int, tuple[int, ...]]:
    result = await store.reserve(TEAM, scopes, amount, rid, expires, now, mode)
    return result.status, result.states, result.denied_index, result.missing


async def test_missing_counters_are_reported_and_nothing_is_held(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(1000)
    await store.init(TEAM, [(team, 0)], NOW)

    status, states, _, missing = await reserve(store, [team, key], 10, "r1")

    assert (status, states, missing) == (ReserveStatus.MISSING, (), (1,))
    assert await store.read(TEAM, [team, key], NOW) == (CounterState(0, 0), None)


async def test_init_sets_if_absent_so_a_second_init_does_not_add(store: CounterStore) -> None:
    team = team_scope(1000)
    await store.init(TEAM, [(team, 500)], NOW)
    await reserve(store, [team], 30, "r1")

    await store.init(TEAM, [(team, 500)], NOW)
    await store.init(TEAM, [(team, 7)], NOW)

    assert await store.read(TEAM, [team], NOW) == (CounterState(500, 30),)


async def test_cross_once_admits_while_below_limit_then_denies(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 99)], NOW)

    # 99 < 100: admitted although the hold takes the counter past the limit.
    status, states, _, _ = await reserve(store, [team], 50, "r1", mode=CROSS)
    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(99, 50),))
    await store.release(TEAM, "r1", NOW)
    await store.settle(TEAM, "", [team], 1, "q1", NOW, 60)

    # spend == limit: the next request is denied, even one holding nothing.
    status, states, index, _ = await reserve(store, [team], 0, "r2", mode=CROSS)
    assert (status, states, index) == (ReserveStatus.DENIED, (CounterState(100, 0),), 0)


async def test_never_exceed_admits_up_to_the_limit_exactly(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 50)], NOW)

    status, _, _, _ = await reserve(store, [team], 51, "r1")
    assert status is ReserveStatus.DENIED
    status, states, _, _ = await reserve(store, [team], 50, "r1")
    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(50, 50),))


async def test_unlimited_scope_always_admits(store: CounterStore) -> None:
    team = team_scope(None)
    await store.init(TEAM, [(team, 10**18)], NOW)

    for mode in (CROSS, NEVER):
        status, _, _, _ = await reserve(store, [team], 10**17, f"r-{mode}", mode=mode)
        assert status is ReserveStatus.RESERVED


async def test_denial_by_key_scope_leaves_team_counter_untouched(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(10)
    await store.init(TEAM, [(team, 0), (key, 0)], NOW)

    status, states, index, _ = await reserve(store, [team, key], 20, "r1")

    assert (status, index) == (ReserveStatus.DENIED, 1)
    assert states == (CounterState(0, 0), CounterState(0, 0))
    assert await store.read(TEAM, [team, key], NOW) == (CounterState(0, 0), CounterState(0, 0))
    assert not await store.release(TEAM, "r1", NOW)


async def test_a_hold_is_placed_on_every_scope(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(10)
    await store.init(TEAM, [(team, 0), (key, 0)], NOW)

    status, states, _, _ = await reserve(store, [team, key], 10, "r1")

    assert status is ReserveStatus.RESERVED
    assert states == (CounterState(0, 10), CounterState(0, 10))


async def test_holds_count_in_later_decisions(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)
    await reserve(store, [team], 60, "r1")

    status, states, _, _ = await reserve(store, [team], 60, "r2")

    assert (status, states) == (ReserveStatus.DENIED, (CounterState(0, 60),))


async def test_holds_expire_at_hold_expires_at(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)
    await reserve(store, [team], 60, "r1", expires=NOW + 30)

    status, _, _, _ = await reserve(store, [team], 60, "r2", now=NOW + 29.5)
    assert status is ReserveStatus.DENIED

    status, states, _, _ = await reserve(store, [team], 60, "r2", now=NOW + 30)
    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(0, 60),))
    assert not await store.release(TEAM, "r1", NOW + 30)


async def test_one_call_releases_at_most_100_expired_holds(store: CounterStore) -> None:
    team = team_scope(None)
    await store.init(TEAM, [(team, 0)], NOW)
    for i in range(150):
        await reserve(store, [team], 1, f"r{i:03}", expires=NOW + 1)

    _, first, _, _ = await reserve(store, [team], 0, "probe", now=NOW + 2)
    _, second, _, _ = await reserve(store, [team], 0, "probe", now=NOW + 2)

    assert (first, second) == ((CounterState(0, 50),), (CounterState(0, 0),))


async def test_reusing_a_reservation_id_replaces_its_hold(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)
    await reserve(store, [team], 60, "r1")

    status, states, _, _ = await reserve(store, [team], 70, "r1")

    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(0, 70),))
    assert await store.release(TEAM, "r1", NOW)
    assert await store.read(TEAM, [team], NOW) == (CounterState(0, 0),)


async def test_zero_amount_holds_nothing(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)

    status, states, _, _ = await reserve(store, [team], 0, "r1")

    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(0, 0),))
    assert not await store.release(TEAM, "r1", NOW)


async def test_settle_releases_hold_and_adds_cost_once(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(1000)
    await store.init(TEAM, [(team, 0), (key, 0)], NOW)
    await reserve(store, [team, key], 60, "r1")
    await reserve(store, [team, key], 5, "r2")

    first = await store.settle(TEAM, "r1", [team, key], 40, "q1", NOW, 60)
    # A retry, even naming another reservation, changes nothing.
    again = await store.settle(TEAM, "r2", [team, key], 40, "q1", NOW + 1, 60)

    after = (CounterState(40, 5), CounterState(40, 5))
    assert (first.applied, first.states) == (True, after)
    assert (again.applied, again.states) == (False, after)
    assert await store.read(TEAM, [team, key], NOW + 1) == after
    assert not await store.release(TEAM, "r1", NOW + 1)
    assert await store.release(TEAM, "r2", NOW + 1)


async def test_settle_on_missing_counter_skips_it(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(1000)
    await store.init(TEAM, [(team, 0)], NOW)

    result = await store.settle(TEAM, "", [team, key], 5, "q1", NOW, 60)

    assert (result.applied, result.states) == (True, (CounterState(5, 0), None))
    assert await store.read(TEAM, [team, key], NOW) == (CounterState(5, 0), None)


async def test_settle_after_the_hold_expired_still_adds_the_cost(store: CounterStore) -> None:
    team = team_scope(1000)
    await store.init(TEAM, [(team, 0)], NOW)
    await reserve(store, [team], 60, "r1", expires=NOW + 10)

    result = await store.settle(TEAM, "r1", [team], 40, "q1", NOW + 10, 60)

    assert result.states == (CounterState(40, 0),)


async def test_release_drops_the_hold_without_spending(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(1000)
    await store.init(TEAM, [(team, 3), (key, 4)], NOW)
    await reserve(store, [team, key], 60, "r1")

    assert await store.release(TEAM, "r1", NOW)
    assert not await store.release(TEAM, "r1", NOW)
    assert await store.read(TEAM, [team, key], NOW) == (CounterState(3, 0), CounterState(4, 0))


async def test_a_different_window_start_is_a_different_counter(store: CounterStore) -> None:
    this, following = team_scope(100, HOUR), team_scope(100, NEXT_HOUR)
    await store.init(TEAM, [(this, 100)], NOW)

    status, _, _, missing = await reserve(store, [following], 10, "r1", now=NEXT_HOUR.start)
    assert (status, missing) == (ReserveStatus.MISSING, (0,))

    await store.init(TEAM, [(following, 0)], NEXT_HOUR.start)
    status, _, _, _ = await reserve(store, [following], 10, "r1", now=NEXT_HOUR.start)
    assert status is ReserveStatus.RESERVED
    assert await store.read(TEAM, [this, following], NEXT_HOUR.start) == (
        CounterState(100, 0),
        CounterState(0, 10),
    )


async def test_small_spends_sum_exactly(store: CounterStore) -> None:
    team, key = team_scope(None), key_scope(None)
    await store.init(TEAM, [(team, 0), (key, 0)], NOW)

    for i in range(2000):
        await store.settle(TEAM, "", [team, key], 100, f"q{i}", NOW, 60)

    assert await store.read(TEAM, [team, key], NOW) == (CounterState(200_000, 0),) * 2


async def test_sums_and_comparisons_are_exact_beyond_2_to_53(store: CounterStore) -> None:
    # 1e18 nano: far beyond where doubles can tell n from n + 1.
    big = 10**18
    team = team_scope(big + 2)
    await store.init(TEAM, [(team, big)], NOW)

    status, states, _, _ = await reserve(store, [team], 2, "r1")
    assert (status, states) == (ReserveStatus.RESERVED, (CounterState(big, 2),))
    status, _, _, _ = await reserve(store, [team], 1, "r2")
    assert status is ReserveStatus.DENIED

    await store.settle(TEAM, "r1", [team], 1, "q1", NOW, 60)
    status, _, _, _ = await reserve(store, [team], 0, "r3", mode=CROSS)
    assert status is ReserveStatus.RESERVED  # big + 1 < big + 2
    await store.settle(TEAM, "", [team], 1, "q2", NOW, 60)
    status, _, _, _ = await reserve(store, [team], 0, "r3", mode=CROSS)
    assert status is ReserveStatus.DENIED  # big + 2 reached the limit
    for i in range(10):
        await store.settle(TEAM, "", [team], 10**17 + 1, f"big{i}", NOW, 60)
    assert await store.read(TEAM, [team], NOW) == (CounterState(2 * big + 12, 0),)


async def test_concurrent_reservations_never_overcommit(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)

    results = await asyncio.gather(*(reserve(store, [team], 10, f"r{i}") for i in range(50)))

    assert sum(status is ReserveStatus.RESERVED for status, *_ in results) == 10
    assert await store.read(TEAM, [team], NOW) == (CounterState(0, 100),)


async def test_negative_amounts_are_refused(store: CounterStore) -> None:
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)

    with pytest.raises(ValueError):
        await reserve(store, [team], -1, "r1")
    with pytest.raises(ValueError):
        await store.settle(TEAM, "", [team], -1, "q1", NOW, 60)
    assert await store.read(TEAM, [team], NOW) == (CounterState(0, 0),)


# -- the in-process store: expiry follows the `now` it is given -------------------------------


async def test_memory_drops_finished_windows_markers_and_holds() -> None:
    store = MemoryCounters()
    team = team_scope(100)
    await store.init(TEAM, [(team, 0)], NOW)
    await reserve(store, [team], 10, "r1", expires=NOW + 30)
    await store.settle(TEAM, "", [team], 5, "q1", NOW, 60)

    grace_end = HOUR_END + 3600  # the grace is the window's length, at least an hour
    assert await store.read(TEAM, [team], grace_end - 1) == (CounterState(5, 10),)
    assert await store.read(TEAM, [team], grace_end) == (None,)
    await store.release(TEAM, "none", grace_end)

    assert not store._counters and not store._done and not store._holds


async def test_memory_dedupe_marker_expires_after_its_ttl() -> None:
    store = MemoryCounters()
    team = team_scope(None)
    await store.init(TEAM, [(team, 0)], NOW)

    await store.settle(TEAM, "", [team], 5, "q1", NOW, 60)
    assert not (await store.settle(TEAM, "", [team], 5, "q1", NOW + 59, 60)).applied
    assert (await store.settle(TEAM, "", [team], 5, "q1", NOW + 60, 60)).applied


async def test_memory_all_time_counters_never_expire() -> None:
    store = MemoryCounters()
    forever = ScopeBudget(ScopeKind.TEAM, TEAM, None, "", ALL_TIME)
    await store.init(TEAM, [(forever, 1)], NOW)

    assert await store.read(TEAM, [forever], NOW + 10**9) == (CounterState(1, 0),)


# -- Redis specifics ----------------------------------------------------------------------------


async def test_redis_recovers_from_script_flush(
    redis_counters: RedisCounters, raw_redis: Redis
) -> None:
    team = team_scope(100)
    await redis_counters.init(TEAM, [(team, 0)], NOW)
    await raw_redis.script_flush()

    await redis_counters.init(TEAM, [(team, 0)], NOW)
    status, _, _, _ = await reserve(redis_counters, [team], 10, "r1")
    await raw_redis.script_flush()
    result = await redis_counters.settle(TEAM, "r1", [team], 7, "q1", NOW, 60)
    await raw_redis.script_flush()

    assert status is ReserveStatus.RESERVED
    assert result.states == (CounterState(7, 0),)
    assert not await redis_counters.release(TEAM, "r1", NOW)


async def test_redis_keys_share_a_slot_and_expire(
    redis_counters: RedisCounters, raw_redis: Redis
) -> None:
    team, forever = team_scope(100), ScopeBudget(ScopeKind.KEY, "k", None, "", ALL_TIME)
    await redis_counters.init(TEAM, [(team, 0), (forever, 0)], NOW)
    await reserve(redis_counters, [team, forever], 10, "r1")
    await redis_counters.settle(TEAM, "", [team], 1, "q1", NOW, 60)

    prefix = redis_counters._prefix
    keys = {key async for key in raw_redis.scan_iter(match=f"{prefix}:*")}
    base = f"{prefix}:{{t:{TEAM}}}"
    assert keys == {
        f"{base}:c:{team.counter_id}",
        f"{base}:c:{forever.counter_id}",
        f"{base}:holds",
        f"{base}:holdexp",
        f"{base}:done:q1",
    }
    assert len({key_slot(key.encode()) for key in keys}) == 1
    # The window ends 3500 s after NOW, plus an hour's grace.
    assert 7000 < await raw_redis.ttl(f"{base}:c:{team.counter_id}") <= 7100
    assert await raw_redis.ttl(f"{base}:c:{forever.counter_id}") == -1
    assert 0 < await raw_redis.ttl(f"{base}:done:q1") <= 60


async def test_redis_team_ids_cannot_escape_their_hash_tag(
    redis_counters: RedisCounters, raw_redis: Redis
) -> None:
    odd = "a}b{c:%"
    scope = ScopeBudget(ScopeKind.TEAM, odd, None, "1h", HOUR)
    await redis_counters.init(odd, [(scope, 0)], NOW)

    keys = [key async for key in raw_redis.scan_iter(match=f"{redis_counters._prefix}:*")]
    assert keys == [f"{redis_counters._prefix}:{{t:a%7Db%7Bc%3A%25}}:c:{scope.counter_id}"]


async def test_redis_outage_is_reported_as_unavailable() -> None:
    store = RedisCounters("redis://127.0.0.1:1/0")  # nothing listens on port 1
    try:
        with pytest.raises(Unavailable, match=r"^redis unavailable: "):
            await store.start()
        with pytest.raises(Unavailable, match=r"^redis unavailable: "):
            await store.read(TEAM, [team_scope(1)], NOW)
        with pytest.raises(Unavailable, match=r"^redis unavailable: "):
            await reserve(store, [team_scope(1)], 1, "r1")
    finally:
        await store.close()


# -- exactly once when counters vanish: ledger snapshots, parked costs ---------------------------
#
# A counter rebuilt from the ledger keeps the snapshot it was summed in; a settle names the
# ledger transaction of its row and adds only if that snapshot did not see it. Snapshots
# here: "xmin:xmax:in-progress" as Postgres writes them.

SNAPSHOT = snapshot_of(100, 110, (104,))  # sees 0..99 and 100..109 except 104


def test_snapshot_visibility_follows_postgres_rules() -> None:
    assert [visible(x, SNAPSHOT) for x in (99, 100, 103, 104, 109, 110, 111)] == [
        True, True, True, False, True, False, False,
    ]  # fmt: skip
    assert not visible(None, SNAPSHOT)
    assert not visible(5, None)
    assert not visible(5, "")
    assert visible(10**15, snapshot_of(10**15 + 1, 10**15 + 1))


async def test_settle_adds_only_what_the_counters_snapshot_did_not_see(
    store: CounterStore,
) -> None:
    team = team_scope(None)
    await store.init(TEAM, [(team, 1000)], NOW, snapshots=[SNAPSHOT])

    seen = await store.settle(TEAM, "", [team], 1, "q1", NOW, 60, xact=103)
    in_progress = await store.settle(TEAM, "", [team], 10, "q2", NOW, 60, xact=104)
    later = await store.settle(TEAM, "", [team], 100, "q3", NOW, 60, xact=110)
    unknown = await store.settle(TEAM, "", [team], 1000, "q4", NOW, 60)

    assert [r.applied for r in (seen, in_progress, later, unknown)] == [True] * 4
    assert await store.read(TEAM, [team], NOW) == (CounterState(2110, 0),)


async def test_a_settle_that_finds_its_counter_missing_is_parked_for_the_rebuild(
    store: CounterStore,
) -> None:
    team, key = team_scope(None), key_scope(None)
    await store.init(TEAM, [(key, 0)], NOW)

    # Three rows settle while the team's counter is gone (Redis was flushed, say).
    await store.settle(TEAM, "", [key, team], 7, "q1", NOW, 60, xact=99)  # the rebuild sees it
    await store.settle(TEAM, "", [key, team], 20, "q2", NOW, 60, xact=104)  # it does not
    await store.settle(TEAM, "", [key, team], 300, "q3", NOW, 60)  # no transaction: skipped
    await store.init(TEAM, [(team, 5000)], NOW, snapshots=[SNAPSHOT])  # 5000 includes the 7

    assert await store.read(TEAM, [key, team], NOW) == (
        CounterState(327, 0),
        CounterState(5020, 0),
    )
    # Taken in once: a second rebuild of a lost counter starts from its own sum again.
    await store.settle(TEAM, "", [team], 1, "q4", NOW, 60, xact=103)
    assert await store.read(TEAM, [team], NOW) == (CounterState(5020, 0),)


async def test_a_counter_built_without_a_snapshot_takes_in_every_parked_cost(
    store: CounterStore,
) -> None:
    team = team_scope(None)
    await store.settle(TEAM, "", [team], 20, "q1", NOW, 60, xact=1)
    await store.init(TEAM, [(team, 0)], NOW)  # e.g. started from 0 while Postgres was down
    assert await store.read(TEAM, [team], NOW) == (CounterState(20, 0),)


# -- settles announced and never done (a budgetd killed between commit and settle) --------------


async def test_an_overdue_settle_is_handed_to_one_caller_at_a_time(store: CounterStore) -> None:
    team = team_scope(1000)
    await store.init(TEAM, [(team, 0)], NOW)
    assert await store.begin_settle(TEAM, [team], "dead", NOW, 10) == (CounterState(0, 0),)
    await store.begin_settle(TEAM, [team], "alive", NOW, 10)
    await store.settle(TEAM, "", [team], 5, "alive", NOW + 1, 60)  # settled: not overdue

    early = await store.reserve(TEAM, [team], 0, "", LATER, NOW + 9, NEVER)
    due = await store.reserve(TEAM, [team], 0, "", LATER, NOW + 10, NEVER)
    claimed = await store.settle(TEAM, "", [team], 1, "other", NOW + 11, 60)
    reclaimed = await store.reserve(TEAM, [team], 0, "", LATER, NOW + 41, NEVER)
    await store.abandon_settle(TEAM, "dead", NOW + 41)
    gone = await store.reserve(TEAM, [team], 0, "", LATER, NOW + 100, NEVER)

    assert early.unsettled == ()
    assert due.unsettled == ("dead",)
    assert claimed.unsettled == ()  # claimed by the reserve above for 30 s
    assert reclaimed.unsettled == ("dead",)  # the claim ran out: handed over again
    assert gone.unsettled == ()


async def test_begin_settle_reads_missing_counters_as_none(store: CounterStore) -> None:
    team, key = team_scope(1000), key_scope(1000)
    await store.init(TEAM, [(team, 3)], NOW)
    assert await store.begin_settle(TEAM, [key, team], "q1", NOW, 10) == (
        None,
        CounterState(3, 0),
    )


# -- forgetting the teams a replica served without Redis ----------------------------------------


@pytest.fixture(params=["redis", "redis_cluster"])
def redis_store(request: pytest.FixtureRequest) -> RedisCounters:
    fixture = "redis_counters" if request.param == "redis" else "redis_cluster_counters"
    found: RedisCounters = request.getfixturevalue(fixture)
    return found


async def test_forget_teams_drops_their_counters_only(redis_store: RedisCounters) -> None:
    other = "team-b"
    mine, theirs = team_scope(1000), ScopeBudget(ScopeKind.TEAM, other, 1000, "1h", HOUR)
    await redis_store.init(TEAM, [(mine, 10), (key_scope(1000), 10)], NOW)
    await redis_store.init(other, [(theirs, 20)], NOW)
    await reserve(redis_store, [mine], 5, "r1")
    await redis_store.reserve(other, [theirs], 5, "r2", LATER, NOW, NEVER)
    await redis_store.settle(TEAM, "", [mine, key_scope(1000)], 1, "q1", NOW, 60)
    missing = ScopeBudget(ScopeKind.KEY, "gone", None, "1h", HOUR)
    await redis_store.settle(TEAM, "", [missing], 1, "q2", NOW, 60, xact=7)  # parks

    assert await redis_store.forget_teams([TEAM]) == 2

    assert await redis_store.read(TEAM, [mine, key_scope(1000), missing], NOW) == (None,) * 3
    assert await redis_store.read(other, [theirs], NOW) == (CounterState(20, 5),)
    # What is still true stays: the hold (released later, from rebuilt counters), the
    # dedupe marker (the request did settle once), the parked cost (its row is in no sum
    # that cannot see it).
    assert await redis_store.release(TEAM, "r1", NOW)
    again = await redis_store.settle(TEAM, "", [mine], 1, "q1", NOW, 60)
    assert not again.applied
    await redis_store.init(TEAM, [(missing, 0)], NOW, snapshots=[snapshot_of(7, 7)])
    assert await redis_store.read(TEAM, [missing], NOW) == (CounterState(1, 0),)


async def test_a_rebuild_that_summed_before_a_forget_creates_nothing(
    redis_store: RedisCounters,
) -> None:
    team = team_scope(None)
    before = await redis_store.team_epoch(TEAM)  # a rebuild reads it, then sums the ledger
    assert before and await redis_store.team_epoch(TEAM) == before
    await redis_store.forget_teams([TEAM])  # meanwhile: spend the sums may have missed
    assert not await redis_store.init(TEAM, [(team, 5)], NOW, epoch=before)
    assert await redis_store.read(TEAM, [team], NOW) == (None,)

    after = await redis_store.team_epoch(TEAM)
    assert after != before
    assert await redis_store.init(TEAM, [(team, 7)], NOW, epoch=after)
    assert await redis_store.read(TEAM, [team], NOW) == (CounterState(7, 0),)


async def test_a_rebuild_that_summed_before_a_flush_creates_nothing(
    redis_counters: RedisCounters, raw_redis: Redis
) -> None:
    team = team_scope(None)
    before = await redis_counters.team_epoch(TEAM)
    await raw_redis.flushdb()  # takes the epoch (and any parked costs) with everything else
    assert not await redis_counters.init(TEAM, [(team, 5)], NOW, epoch=before)
    after = await redis_counters.team_epoch(TEAM)
    assert await redis_counters.init(TEAM, [(team, 5)], NOW, epoch=after)


async def test_the_epoch_never_changes_where_nothing_forgets(store: CounterStore) -> None:
    epoch = await store.team_epoch(TEAM)
    assert await store.init(TEAM, [(team_scope(None), 1)], NOW, epoch=epoch)
    assert await store.team_epoch(TEAM) == epoch


# -- rate limits (rpm, tpm) in the same atomic step as the budgets -------------------------------
#
# Every store, PostgresCounters included (its limiters are in process: budgets there are the
# ledger's, which these tests leave empty, so they hold on unlimited or zero budgets only).

MEMBER = "user-1"


def rpm(per_minute: int, *, key: str = "key-1", user: str = "") -> RateLimit:
    if user:
        return RateLimit(ScopeKind.MEMBER, TEAM, RateUnit.REQUESTS, per_minute, user_id=user)
    return RateLimit(ScopeKind.KEY, key, RateUnit.REQUESTS, per_minute)


def tpm(per_minute: int) -> RateLimit:
    return RateLimit(ScopeKind.KEY, "key-1", RateUnit.TOKENS, per_minute)


@pytest.fixture
async def postgres_counters(database_url: str) -> AsyncIterator[PostgresCounters]:
    store = PostgresCounters(database_url)
    await store.start()  # applies the migrations
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture(params=["memory", "redis", "redis_cluster", "postgres"])
def any_store(request: pytest.FixtureRequest) -> CounterStore:
    """Every store, PostgresCounters included (a sync fixture: it may start the services)."""
    if request.param == "memory":
        return MemoryCounters()
    fixture = {
        "redis": "redis_counters",
        "redis_cluster": "redis_cluster_counters",
        "postgres": "postgres_counters",
    }[request.param]
    found: CounterStore = request.getfixturevalue(fixture)
    return found


@pytest.fixture
async def rate_store(any_store: CounterStore) -> CounterStore:
    """Each rate-limit contract test runs once per store; the team's counter is ready."""
    await any_store.init(TEAM, [(team_scope(None), 0)], NOW)
    return any_store


async def limited(
    store: CounterStore,
    rates: list[RateCharge],
    rid: str = "",
    *,
    amount: int = 0,
    now: float = NOW,
    mode: Enforcement = NEVER,
    limit: int | None = None,
    team: str = TEAM,
) -> ReserveResult:
    """A reserve on the team's counter (unlimited unless ``limit``) with these rate charges."""
    scope = ScopeBudget(ScopeKind.TEAM, team, limit, "1h", HOUR)
    return await store.reserve(team, [scope], amount, rid, LATER, now, mode, rates=rates)


async def remaining(store: CounterStore, limit: RateLimit, now: float = NOW) -> int:
    """What is left of a limiter (reserving 0 tokens, or reading a request limiter's state)."""
    result = await limited(store, [RateCharge(limit, 0)], now=now)
    assert result.status is ReserveStatus.RESERVED
    return result.rates[0].remaining


async def test_rpm_3_admits_3_then_rate_limits_with_retry_after_20_s(
    rate_store: CounterStore,
) -> None:
    limit = rpm(3)
    results = [
        await limited(rate_store, [RateCharge(limit, 1)], f"r{i}", amount=10) for i in range(5)
    ]

    assert [r.status for r in results] == [ReserveStatus.RESERVED] * 3 + [
        ReserveStatus.RATE_LIMITED
    ] * 2
    assert [r.rates for r in results[:3]] == [
        (RateState(3, 2, 20.0),),
        (RateState(3, 1, 40.0),),
        (RateState(3, 0, 60.0),),
    ]
    refused = results[3]
    assert (refused.rate_index, refused.retry_after) == (0, 20.0)
    assert refused.rates == (RateState(3, 0, 60.0),)  # as read: nothing charged
    assert refused.states == (CounterState(0, 30),)  # the budget as read: three holds
    # The refused requests hold nothing.
    assert await rate_store.read(TEAM, [team_scope(None)], NOW) == (CounterState(0, 30),)
    assert not await rate_store.release(TEAM, "r3", NOW)

    assert (
        await limited(rate_store, [RateCharge(limit, 1)], now=NOW + 19.999)
    ).retry_after == 0.001
    later = await limited(rate_store, [RateCharge(limit, 1)], "r5", amount=10, now=NOW + 20)
    assert (later.status, later.rates) == (ReserveStatus.RESERVED, (RateState(3, 0, 60.0),))
    again = await limited(rate_store, [RateCharge(limit, 1)], now=NOW + 20)
    assert again.status is ReserveStatus.RATE_LIMITED


async def test_a_budget_denial_charges_no_rate(rate_store: CounterStore) -> None:
    limit = rpm(1)
    denied = await limited(rate_store, [RateCharge(limit, 1)], "r1", amount=10, limit=0, mode=CROSS)
    assert (denied.status, denied.denied_index, denied.rates) == (ReserveStatus.DENIED, 0, ())

    admitted = await limited(rate_store, [RateCharge(limit, 1)], "r2", amount=10)
    assert (admitted.status, admitted.rates) == (ReserveStatus.RESERVED, (RateState(1, 0, 60.0),))


async def test_a_missing_counter_charges_no_rate() -> None:
    store, limit = MemoryCounters(), rpm(1)
    missing = await limited(store, [RateCharge(limit, 1)])
    assert (missing.status, missing.rates) == (ReserveStatus.MISSING, ())
    await store.init(TEAM, [(team_scope(None), 0)], NOW)
    assert (await limited(store, [RateCharge(limit, 1)])).status is ReserveStatus.RESERVED


async def test_missing_counters_in_redis_charge_no_rate(redis_counters: RedisCounters) -> None:
    limit = rpm(1)
    assert (await limited(redis_counters, [RateCharge(limit, 1)])).status is ReserveStatus.MISSING
    await redis_counters.init(TEAM, [(team_scope(None), 0)], NOW)
    result = await limited(redis_counters, [RateCharge(limit, 1)])
    assert result.status is ReserveStatus.RESERVED


async def test_tpm_estimate_is_charged_at_reserve_and_corrected_once_at_settle(
    rate_store: CounterStore,
) -> None:
    limit, team = tpm(1000), [team_scope(None)]
    reserved = await limited(rate_store, [RateCharge(limit, 300)], "r1", amount=10)
    assert reserved.rates == (RateState(1000, 700, 18.0),)

    more = await rate_store.settle(
        TEAM, "r1", team, 5, "q1", NOW, 60, rates=[RateCharge(limit, 200)]
    )
    assert more.applied
    assert await remaining(rate_store, limit) == 500
    duplicate = await rate_store.settle(
        TEAM, "r1", team, 5, "q1", NOW, 60, rates=[RateCharge(limit, 200)]
    )
    assert await remaining(rate_store, limit) == 500  # the correction counted once
    if isinstance(rate_store, PostgresCounters):
        assert duplicate.applied  # its budgets need no dedupe; its limiters dedupe anyway
    else:
        assert not duplicate.applied

    await rate_store.settle(TEAM, "", team, 5, "q2", NOW, 60, rates=[RateCharge(limit, -400)])
    assert await remaining(rate_store, limit) == 900
    await rate_store.settle(TEAM, "", team, 5, "q3", NOW, 60, rates=[RateCharge(limit, -(10**6))])
    assert (await limited(rate_store, [RateCharge(limit, 0)])).rates == (
        RateState(1000, 1000, 0.0),
    )


async def test_tpm_cross_once_admits_the_crossing_request_never_exceed_does_not(
    rate_store: CounterStore,
) -> None:
    cross, never = tpm(100), RateLimit(ScopeKind.TEAM, TEAM, RateUnit.TOKENS, 100)
    for mode, limit in ((CROSS, cross), (NEVER, never)):
        assert (await limited(rate_store, [RateCharge(limit, 80)], mode=mode)).status is (
            ReserveStatus.RESERVED
        )
    crossing = await limited(rate_store, [RateCharge(cross, 80)], mode=CROSS)
    assert crossing.status is ReserveStatus.RESERVED
    after = await limited(rate_store, [RateCharge(cross, 1)], mode=CROSS)
    assert (after.status, after.retry_after) == (ReserveStatus.RATE_LIMITED, 36.001)

    too_much = await limited(rate_store, [RateCharge(never, 80)], mode=NEVER)
    assert (too_much.status, too_much.retry_after) == (ReserveStatus.RATE_LIMITED, 36.0)
    assert (await limited(rate_store, [RateCharge(never, 20)], mode=NEVER)).rates == (
        RateState(100, 0, 60.0),
    )


async def test_two_limiters_are_charged_all_or_nothing(rate_store: CounterStore) -> None:
    key, member = rpm(2), rpm(1, user=MEMBER)
    both = [RateCharge(key, 1), RateCharge(member, 1)]
    assert (await limited(rate_store, both, "r1", amount=10)).status is ReserveStatus.RESERVED

    refused = await limited(rate_store, both, "r2", amount=10)
    assert (refused.status, refused.rate_index, refused.retry_after) == (
        ReserveStatus.RATE_LIMITED,
        1,
        60.0,
    )
    assert refused.rates == (RateState(2, 1, 30.0), RateState(1, 0, 60.0))
    assert await rate_store.read(TEAM, [team_scope(None)], NOW) == (CounterState(0, 10),)
    # The key's limiter took nothing from the refused request: one more fits, then none.
    assert (await limited(rate_store, [RateCharge(key, 1)])).status is ReserveStatus.RESERVED
    assert (await limited(rate_store, [RateCharge(key, 1)])).status is ReserveStatus.RATE_LIMITED


async def test_several_refusals_report_the_first_and_the_longest_wait(
    rate_store: CounterStore,
) -> None:
    slow, fast = rpm(1, key="slow"), rpm(6, key="fast")
    await limited(rate_store, [RateCharge(slow, 1)] + [RateCharge(fast, 1)] * 6)
    refused = await limited(rate_store, [RateCharge(fast, 1), RateCharge(slow, 1)])
    assert (refused.rate_index, refused.retry_after) == (0, 60.0)


async def test_a_limiter_named_twice_counts_both_charges(rate_store: CounterStore) -> None:
    limit = rpm(1)
    twice = await limited(rate_store, [RateCharge(limit, 1), RateCharge(limit, 1)])
    assert (twice.status, twice.rate_index) == (ReserveStatus.RATE_LIMITED, 1)
    assert (await limited(rate_store, [RateCharge(limit, 1)])).status is ReserveStatus.RESERVED


async def test_limiters_of_different_ids_are_independent(rate_store: CounterStore) -> None:
    used = rpm(1)
    assert (await limited(rate_store, [RateCharge(used, 1)])).status is ReserveStatus.RESERVED
    assert (await limited(rate_store, [RateCharge(used, 1)])).status is ReserveStatus.RATE_LIMITED

    others = [
        rpm(1, key="key-2"),
        rpm(1, user=MEMBER),
        rpm(1, user="user-2"),
        RateLimit(ScopeKind.TEAM, TEAM, RateUnit.REQUESTS, 1),
        RateLimit(ScopeKind.KEY, "key-1", RateUnit.TOKENS, 1),
    ]
    for other in others:
        result = await limited(rate_store, [RateCharge(other, 1)])
        assert result.status is ReserveStatus.RESERVED, other
    # The same limiter id under another team is another limiter.
    await rate_store.init(
        "team-b", [(ScopeBudget(ScopeKind.TEAM, "team-b", None, "1h", HOUR), 0)], NOW
    )
    elsewhere = await limited(rate_store, [RateCharge(used, 1)], team="team-b")
    assert elsewhere.status is ReserveStatus.RESERVED


async def test_concurrent_reserves_against_rpm_5_admit_exactly_5(rate_store: CounterStore) -> None:
    limit = rpm(5)
    results = await asyncio.gather(
        *(limited(rate_store, [RateCharge(limit, 1)], f"r{i}", amount=10) for i in range(20))
    )
    assert sum(r.status is ReserveStatus.RESERVED for r in results) == 5
    assert sum(r.status is ReserveStatus.RATE_LIMITED for r in results) == 15
    assert await rate_store.read(TEAM, [team_scope(None)], NOW) == (CounterState(0, 50),)


async def test_the_largest_limits_stay_exact(rate_store: CounterStore) -> None:
    big = RateLimit(ScopeKind.KEY, "key-1", RateUnit.TOKENS, MAX_PER_MINUTE)
    first = await limited(rate_store, [RateCharge(big, MAX_CHARGE - 1)])
    assert first.rates == (RateState(MAX_PER_MINUTE, 1, 60.0),)
    refused = await limited(rate_store, [RateCharge(big, 2)])
    assert (refused.status, refused.retry_after) == (ReserveStatus.RATE_LIMITED, 0.001)
    assert (await limited(rate_store, [RateCharge(big, 1)])).rates == (
        RateState(MAX_PER_MINUTE, 0, 60.0),
    )

    # A run of huge positive corrections is capped at MAX_LEVEL (2^52 unit-ms), exactly.
    tiny, team = tpm(1), [team_scope(None)]
    for i in range(80):
        await rate_store.settle(
            TEAM, "", team, 0, f"q{i}", NOW, 60, rates=[RateCharge(tiny, MAX_CHARGE)]
        )
    capped = await limited(rate_store, [RateCharge(tiny, 0)], mode=CROSS)
    assert capped.rates == (RateState(1, 0, MAX_LEVEL / 1000),)
    assert capped.retry_after == (MAX_LEVEL - WINDOW_MS + 1) / 1000


async def test_out_of_range_rate_charges_are_refused(rate_store: CounterStore) -> None:
    team = [team_scope(None)]
    for bad in (
        RateCharge(rpm(0), 1),
        RateCharge(rpm(MAX_PER_MINUTE + 1), 1),
        RateCharge(tpm(5), -1),
    ):
        with pytest.raises(ValueError):
            await limited(rate_store, [bad])
    with pytest.raises(ValueError):
        await rate_store.settle(
            TEAM, "", team, 0, "q1", NOW, 60, rates=[RateCharge(tpm(5), -MAX_CHARGE - 1)]
        )
    assert await remaining(rate_store, tpm(5)) == 5


async def test_member_and_model_scopes_are_counters_of_their_own(store: CounterStore) -> None:
    team = team_scope(100)
    member = ScopeBudget(ScopeKind.MEMBER, TEAM, 10, "1h", HOUR, user_id="a/b c")
    model = ScopeBudget(ScopeKind.KEY, "key-1", 10, "1h", HOUR, model="gpt-4o")
    member_model = ScopeBudget(ScopeKind.MEMBER, TEAM, 10, "1h", HOUR, user_id="u", model="m")
    scopes = [team, member, model, member_model]
    await store.init(TEAM, [(team, 1), (member, 2), (model, 3), (member_model, 4)], NOW)

    status, states, _, _ = await reserve(store, scopes, 5, "r1")
    assert status is ReserveStatus.RESERVED
    assert states == (
        CounterState(1, 5),
        CounterState(2, 5),
        CounterState(3, 5),
        CounterState(4, 5),
    )
    await store.settle(TEAM, "r1", [member], 5, "q1", NOW, 60)
    assert await store.read(TEAM, scopes, NOW) == (
        CounterState(1, 0),
        CounterState(7, 0),
        CounterState(3, 0),
        CounterState(4, 0),
    )


async def test_memory_forgets_rate_limiters_once_drained() -> None:
    store = MemoryCounters()
    await store.init(TEAM, [(team_scope(None), 0)], NOW)
    await limited(store, [RateCharge(rpm(3), 1), RateCharge(tpm(10), 5)])
    assert len(store._limiters) == 2

    # Each is kept 1 ms past the instant it is empty (ratelimit.expiry_ms).
    await store.read(TEAM, [team_scope(None)], NOW + 20)  # rpm 3: empty after 20 s
    assert len(store._limiters) == 2
    await store.read(TEAM, [team_scope(None)], NOW + 20.001)
    assert len(store._limiters) == 1
    await store.read(TEAM, [team_scope(None)], NOW + 30.001)  # 5 of tpm 10: after 30 s
    assert len(store._limiters) == 0


async def test_postgres_spend_of_member_and_model_scopes_is_their_ledger_rows(
    database_url: str, postgres_counters: PostgresCounters
) -> None:
    records = PostgresRecords(database_url)
    await records.start()
    try:
        for request_id, key_id, user_id, model, cost in [
            ("a", "key-1", "u1", "m1", 1),
            ("b", "key-1", "u1", "m2", 10),
            ("c", "key-2", "u2", "m1", 100),
            ("d", "key-1", "", "m1", 1000),
        ]:
            entry = LedgerEntry(
                request_id, TEAM, key_id, cost, NOW, NOW, model=model, user_id=user_id
            )
            assert (await records.insert_spend(entry)).inserted
    finally:
        await records.close()

    def member(user: str, model: str = "") -> ScopeBudget:
        return ScopeBudget(ScopeKind.MEMBER, TEAM, 20, "1h", HOUR, user_id=user, model=model)

    scopes = [
        team_scope(None),
        member("u1"),
        member("u2"),
        member("u1", "m1"),
        ScopeBudget(ScopeKind.KEY, "key-1", None, "1h", HOUR, model="m1"),
        ScopeBudget(ScopeKind.TEAM, TEAM, None, "1h", HOUR, model="m1"),
    ]
    spend = [1111, 11, 100, 1, 1001, 1101]
    states = await postgres_counters.read(TEAM, scopes, NOW)
    assert states == tuple(CounterState(s, 0) for s in spend)

    # Holds on member and model scopes are placed, counted and released like any other.
    result = await postgres_counters.reserve(
        TEAM, [scopes[1], scopes[5]], 5, "r1", LATER, NOW, NEVER
    )
    assert result.states == (CounterState(11, 5), CounterState(1101, 5))
    denied = await postgres_counters.reserve(TEAM, [scopes[1]], 5, "r2", LATER, NOW, NEVER)
    assert (denied.status, denied.states) == (ReserveStatus.DENIED, (CounterState(11, 5),))
    assert await postgres_counters.read(TEAM, scopes, NOW) == tuple(
        CounterState(s, 5 if i in (1, 5) else 0) for i, s in enumerate(spend)
    )
    assert await postgres_counters.release(TEAM, "r1", NOW)


# -- Redis: limiter keys ------------------------------------------------------------------------


async def test_redis_limiter_keys_share_the_teams_slot_and_expire_when_drained(
    redis_counters: RedisCounters, raw_redis: Redis
) -> None:
    team = team_scope(None)
    await redis_counters.init(TEAM, [(team, 0)], NOW)
    key, member, tokens = rpm(3), rpm(2, user="a b"), tpm(1000)
    charges = [RateCharge(key, 1), RateCharge(member, 1), RateCharge(tokens, 500)]
    await limited(redis_counters, charges, "r1", amount=10)

    base = f"{redis_counters._prefix}:{{t:{TEAM}}}"
    names = {f"{base}:rl:{limit.limiter_id}" for limit in (key, member, tokens)}
    found = {name async for name in raw_redis.scan_iter(match=f"{base}:rl:*")}
    assert found == names
    assert len({key_slot(name.encode()) for name in [*names, f"{base}:c:{team.counter_id}"]}) == 1
    assert 19_000 < await raw_redis.pttl(f"{base}:rl:{key.limiter_id}") <= 20_001
    assert 29_000 < await raw_redis.pttl(f"{base}:rl:{member.limiter_id}") <= 30_001
    assert await raw_redis.hgetall(f"{base}:rl:{key.limiter_id}") == {
        "level": str(WINDOW_MS),
        "at": str(round(NOW * 1000)),
    }

    # A correction that empties a bucket deletes it; forgetting counters leaves limiters.
    await redis_counters.settle(
        TEAM, "r1", [team], 1, "q1", NOW, 60, rates=[RateCharge(tokens, -500)]
    )
    assert not await raw_redis.exists(f"{base}:rl:{tokens.limiter_id}")
    await redis_counters.forget_teams([TEAM])
    assert await raw_redis.exists(f"{base}:rl:{key.limiter_id}")


async def test_redis_cluster_runs_rate_limits_in_the_teams_slot(
    redis_cluster_counters: RedisCounters,
) -> None:
    other = "team-z"
    scope = ScopeBudget(ScopeKind.TEAM, other, None, "1h", HOUR)
    await redis_cluster_counters.init(other, [(scope, 0)], NOW)
    limit = RateLimit(ScopeKind.MEMBER, other, RateUnit.REQUESTS, 1, user_id="u")
    first = await limited(redis_cluster_counters, [RateCharge(limit, 1)], team=other)
    second = await limited(redis_cluster_counters, [RateCharge(limit, 1)], team=other)
    assert (first.status, second.status) == (ReserveStatus.RESERVED, ReserveStatus.RATE_LIMITED)
