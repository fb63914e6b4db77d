"""The CounterStore contract, run against the in-process store and a real Redis.

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
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    CounterStore,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
)
from server.storage.memory_counters import MemoryCounters
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
