"""Concurrent Redis script calls share pipelines (server/storage/redis_pipeline.py).

Batching is observed through the batcher's counts, never through timing: calls started in the
same event-loop iteration are sent as one call (nothing in flight) plus one pipeline of the
rest. Results must be exactly those of the unbatched path, which sequential calls take.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    RateCharge,
    RateLimit,
    RateUnit,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
)
from server.storage.redis_counters import RedisCounters
from server.storage.redis_keys import TeamKeys
from server.storage.redis_pipeline import LINGER_CALLS, ScriptBatcher
from server.windows import Window
from services import RedisServer

HOUR_END = 1_700_002_800
HOUR = Window(HOUR_END - 3600, HOUR_END)
NOW = HOUR.start + 100.0
LATER = NOW + 600
NEVER = Enforcement.NEVER_EXCEED
TEAMS = 100

ECHO = "if ARGV[1] == 'boom' then error('boom') end return ARGV[1]"
# Busy for ARGV[1] microseconds: Redis runs nothing else meanwhile, so what is sent after it
# stays in flight that long.
SLOW = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1])
return 'slept'
"""


def team_id(i: int) -> str:
    return f"team-{i:03d}"


def budget(i: int) -> ScopeBudget:
    return ScopeBudget(ScopeKind.TEAM, team_id(i), 100 * (i % 7) if i % 5 else None, "1h", HOUR)


def unlimited(i: int) -> ScopeBudget:
    return ScopeBudget(ScopeKind.TEAM, team_id(i), None, "1h", HOUR)


def key_budget(i: int) -> ScopeBudget:
    return ScopeBudget(ScopeKind.KEY, f"key-{i}", 1000, "1h", HOUR)


def rpm(i: int) -> RateCharge:
    return RateCharge(RateLimit(ScopeKind.KEY, f"key-{i}", RateUnit.REQUESTS, 2), 1)


def batcher_of(store: RedisCounters) -> ScriptBatcher:
    batcher = store.script_batcher
    assert batcher is not None
    return batcher


def sent(batcher: ScriptBatcher) -> int:
    return batcher.direct_calls + batcher.pipelined_calls


async def started(url: str) -> RedisCounters:
    store = RedisCounters(url, prefix=f"bdtest-{secrets.token_hex(6)}")
    await store.start()
    return store


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisCounters]:
    """A started single-node RedisCounters under a random prefix."""
    counters = await started(redis_url)
    try:
        yield counters
    finally:
        await counters.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the test Redis."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def workload(store: RedisCounters, i: int) -> list[object]:
    """Every script, once or more, on team i: denials, rate limits, dedupe, missing counters."""
    team, scopes = team_id(i), [budget(i), key_budget(i)]
    rates = [rpm(i)]
    return [
        await store.reserve(team, scopes, 10, "r0", LATER, NOW, NEVER),  # missing
        await store.init(team, [(scopes[0], 50 * (i % 4)), (scopes[1], 0)], NOW),
        await store.reserve(team, scopes, 250, "r1", LATER, NOW, NEVER, rates=rates),
        await store.begin_settle(team, scopes, "q1", NOW, 30),
        await store.settle(team, "r1", scopes, 120, "q1", NOW, 60),
        await store.settle(team, "r1", scopes, 120, "q1", NOW, 60),  # a repeat
        await store.reserve(team, scopes, 40, "r2", LATER, NOW, NEVER, rates=rates),
        await store.reserve(team, scopes, 40, "r3", LATER, NOW, NEVER, rates=rates),
        await store.release(team, "r2", NOW),
        await store.release(team, "r2", NOW),
        await store.read(team, scopes, NOW),
    ]


async def test_concurrent_calls_share_pipelines_with_the_results_of_single_calls(
    redis_url: str,
) -> None:
    batched, single = await started(redis_url), await started(redis_url)
    try:
        concurrent = await asyncio.gather(*(workload(batched, i) for i in range(TEAMS)))
        sequential = [await workload(single, i) for i in range(TEAMS)]
        batches, singles = batcher_of(batched), batcher_of(single)
    finally:
        await batched.close()
        await single.close()

    assert concurrent == sequential
    statuses = {r.status for rs in sequential for r in rs if isinstance(r, ReserveResult)}
    assert statuses == set(ReserveStatus)  # the workload meets every outcome
    # Ten scripts per team (read is a plain pipeline of HMGETs, not a script).
    assert sent(batches) == sent(singles) == TEAMS * 10
    assert singles.pipelines == 0  # one call at a time: the unbatched path only
    assert 0 < batches.pipelines <= batches.pipelined_calls // 10
    assert batches.pipelined_calls > TEAMS * 9


async def test_a_script_error_fails_only_its_own_call(
    store: RedisCounters, raw_redis: Redis
) -> None:
    await asyncio.gather(*(store.init(team_id(i), [(budget(i), 0)], NOW) for i in range(20)))
    # A hash where the script expects a sorted set: its ZADD fails inside reserve.lua.
    await raw_redis.hset(TeamKeys(store._prefix, team_id(7)).hold_expiry, "x", "1")
    batcher = batcher_of(store)
    pipelined = batcher.pipelined_calls

    results = await asyncio.gather(
        *(store.reserve(team_id(i), [budget(i)], 0, f"r{i}", LATER, NOW, NEVER) for i in range(20)),
        return_exceptions=True,
    )

    assert batcher.pipelined_calls - pipelined == 19  # all but the first, in one pipeline
    error = results.pop(7)
    assert isinstance(error, ResponseError) and "WRONGTYPE" in str(error)
    assert all(getattr(r, "status", None) is ReserveStatus.RESERVED for r in results), results


async def test_script_flush_between_batches_reloads_the_scripts(
    store: RedisCounters, raw_redis: Redis
) -> None:
    batcher = batcher_of(store)
    teams = range(30)

    async def each(call: Callable[[int], Awaitable[Any]]) -> list[Any]:
        await raw_redis.script_flush()
        pipelines = batcher.pipelines
        results = await asyncio.gather(*(call(i) for i in teams))
        assert batcher.pipelines > pipelines
        return results

    created = await each(lambda i: store.init(team_id(i), [(budget(i), 0)], NOW))
    # Several scripts missing from one pipeline at once: reserve, settle and release.
    mixed = await each(
        lambda i: (
            store.reserve(team_id(i), [budget(i)], 0, "r", LATER, NOW, NEVER)
            if i % 3 == 0
            else store.settle(team_id(i), "", [budget(i)], 5, "q", NOW, 60)
            if i % 3 == 1
            else store.release(team_id(i), "r", NOW)
        )
    )
    settled = await each(lambda i: store.settle(team_id(i), "", [budget(i)], 1, "q2", NOW, 60))

    assert created == [True] * len(teams)
    assert [getattr(r, "status", r) for r in mixed[::3]] == [ReserveStatus.RESERVED] * 10
    assert [r.applied for r in mixed[1::3]] == [True] * 10
    assert mixed[2::3] == [False] * 10
    assert [r.states for r in settled] == [
        (CounterState(6 if i % 3 == 1 else 1, 0),) for i in teams
    ]


async def test_redis_down_fails_every_caller_with_unavailable_then_a_restart_recovers(
    own_redis: RedisServer,
) -> None:
    store = await started(own_redis.url)
    try:
        batcher = batcher_of(store)
        await own_redis.stop()
        pipelines = batcher.pipelines

        results = await asyncio.gather(
            *(store.init(team_id(i), [(budget(i), 0)], NOW) for i in range(40)),
            return_exceptions=True,
        )

        assert batcher.pipelines > pipelines
        assert all(isinstance(r, Unavailable) for r in results), results
        assert all(str(r).startswith("redis unavailable: ") for r in results)

        # A new, empty server on the same port: no keys and no scripts.
        await own_redis.start()
        created = await asyncio.gather(
            *(store.init(team_id(i), [(budget(i), 0)], NOW) for i in range(40))
        )
        reserved = await asyncio.gather(
            *(store.reserve(team_id(i), [budget(i)], 0, "r", LATER, NOW, NEVER) for i in range(40))
        )
        assert created == [True] * 40
        assert {r.status for r in reserved} == {ReserveStatus.RESERVED}
        assert batcher.pipelines > pipelines + 1
    finally:
        await store.close()


async def test_a_stalled_redis_times_out_each_round_trip_and_no_late_reply_is_misread(
    own_redis: RedisServer,
) -> None:
    """Redis stopped (SIGSTOP): connections stay open and nothing is answered. The batcher's
    client has no socket timeout, so only the batcher's own per-round-trip timeout ends
    the wait; afterwards the stalled connection's late replies reach nobody."""
    client = Redis.from_url(own_redis.url, decode_responses=True, socket_connect_timeout=1)
    batcher = ScriptBatcher(client, timeout=0.3)
    store = await started(own_redis.url)
    pid = own_redis.pid
    assert pid is not None
    try:
        script = client.register_script(ECHO)
        assert await batcher.call(script, [], ["warm"]) == "warm"
        await store.init(team_id(1), [(budget(1), 0)], NOW)
        direct, pipelines = batcher.direct_calls, batcher.pipelines
        os.kill(pid, signal.SIGSTOP)
        try:
            stalled = await asyncio.wait_for(
                asyncio.gather(
                    *(batcher.call(script, [], [f"stalled-{i}"]) for i in range(10)),
                    return_exceptions=True,
                ),
                10,
            )
            # The counter store's batcher is built the same way, with its own timeout.
            with pytest.raises(Unavailable):
                await asyncio.wait_for(
                    store.reserve(team_id(1), [budget(1)], 1, "r", LATER, NOW, NEVER), 10
                )
        finally:
            os.kill(pid, signal.SIGCONT)

        assert all(isinstance(r, TimeoutError) for r in stalled), stalled
        # Both kinds of round trip timed out: the call sent at once, then the rest queued
        # behind it as one pipeline.
        assert (batcher.direct_calls - direct, batcher.pipelines - pipelines) == (1, 1)
        # Redis runs the stalled calls once it resumes; their replies went to connections
        # that were dropped, so each new call reads its own.
        again = await asyncio.gather(*(batcher.call(script, [], [f"after-{i}"]) for i in range(10)))
        assert again == [f"after-{i}" for i in range(10)]
        reserved = await store.reserve(team_id(1), [budget(1)], 1, "r2", LATER, NOW, NEVER)
        assert reserved.status is ReserveStatus.RESERVED
    finally:
        await batcher.aclose()
        await client.aclose()
        await store.close()


async def test_a_cancelled_waiter_is_not_sent_and_the_others_complete(
    store: RedisCounters,
) -> None:
    await asyncio.gather(*(store.init(team_id(i), [(unlimited(i), 0)], NOW) for i in range(20)))
    batcher = batcher_of(store)
    before = sent(batcher)

    tasks = [
        asyncio.create_task(store.reserve(team_id(i), [unlimited(i)], 1, "r", LATER, NOW, NEVER))
        for i in range(20)
    ]
    await asyncio.sleep(0)  # every task has queued its call; none has been sent but the first
    tasks[5].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(done.pop(5), asyncio.CancelledError)
    assert {getattr(r, "status", r) for r in done} == {ReserveStatus.RESERVED}
    assert sent(batcher) - before == 19
    assert await store.read(team_id(5), [unlimited(5)], NOW) == (CounterState(0, 0),)
    assert await store.read(team_id(6), [unlimited(6)], NOW) == (CounterState(0, 1),)


# -- the batcher on its own ------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """A plain single-node client, as RedisCounters makes."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield redis
    finally:
        await redis.aclose()


async def test_a_waiter_cancelled_in_flight_leaves_the_pipeline_to_the_others(
    client: Redis,
) -> None:
    # Two in flight: the slow call alone, and the pipeline of the others beside it.
    batcher = ScriptBatcher(client, max_in_flight=2)
    echo, slow = client.register_script(ECHO), client.register_script(SLOW)
    first = asyncio.create_task(batcher.call(slow, [], ["100000"]))  # 0.1 s
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(batcher.call(echo, [], [str(i)])) for i in range(10)]
    for _ in range(1000):
        if batcher.pipelines:
            break
        await asyncio.sleep(0.001)
    assert batcher.pipelines == 1 and not first.done()

    waiters[3].cancel()
    replies = await asyncio.gather(*waiters, return_exceptions=True)

    assert await first == "slept"
    assert isinstance(replies.pop(3), asyncio.CancelledError)
    assert replies == [str(i) for i in range(10) if i != 3]
    assert (batcher.pipelines, batcher.pipelined_calls, batcher.direct_calls) == (1, 10, 1)
    await batcher.aclose()


async def test_a_lua_error_goes_to_its_caller_only_and_batches_are_bounded(
    client: Redis,
) -> None:
    batcher = ScriptBatcher(client, max_batch=16, max_in_flight=2)
    echo = client.register_script(ECHO)
    await client.script_flush()
    args = ["boom" if i % 50 == 7 else str(i) for i in range(200)]

    replies = await asyncio.gather(
        *(batcher.call(echo, [], [arg]) for arg in args), return_exceptions=True
    )

    for arg, reply in zip(args, replies, strict=True):
        if arg == "boom":
            assert isinstance(reply, ResponseError) and "boom" in str(reply)
        else:
            assert reply == arg
    assert batcher.direct_calls + batcher.pipelined_calls == 200
    assert batcher.pipelines >= batcher.pipelined_calls / 16  # never more than 16 in one
    await batcher.aclose()
    with pytest.raises(RuntimeError, match="after aclose"):
        await batcher.call(echo, [], ["1"])


async def test_a_small_pipeline_waits_for_company_and_a_full_one_does_not(client: Redis) -> None:
    echo = client.register_script(ECHO)
    batcher = ScriptBatcher(client, linger=0.2)
    first = asyncio.create_task(batcher.call(echo, [], ["first"]))  # nothing in flight: direct
    await asyncio.sleep(0)
    early = asyncio.create_task(batcher.call(echo, [], ["early"]))  # queued behind it
    await first
    await asyncio.sleep(0.02)  # the pipeline carrying "early" is waiting for company ...
    late = [asyncio.create_task(batcher.call(echo, [], [str(i)])) for i in range(2)]
    assert await asyncio.gather(early, *late) == ["early", "0", "1"]
    assert (batcher.pipelines, batcher.pipelined_calls, batcher.direct_calls) == (1, 3, 1)

    # LINGER_CALLS calls waiting: the pipeline goes at once, however long the linger.
    slow_batcher = ScriptBatcher(client, linger=60.0)
    head = asyncio.create_task(slow_batcher.call(echo, [], ["head"]))
    await asyncio.sleep(0)
    calls = [slow_batcher.call(echo, [], [str(i)]) for i in range(LINGER_CALLS)]
    replies = await asyncio.wait_for(asyncio.gather(head, *calls), 10)
    assert replies == ["head", *map(str, range(LINGER_CALLS))]
    assert slow_batcher.pipelines == 1
    await batcher.aclose()
    await slow_batcher.aclose()
