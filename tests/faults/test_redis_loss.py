"""Redis loses everything mid-load: FLUSHALL, or a restart into an empty server.

DESIGN §8: counters are a cache of the ledger, so after Redis loses its data they are rebuilt
from Postgres by *setting* them, never by adding. Requests caught in flight by the loss (their
ledger row written, their counters not yet settled) must be counted exactly once whichever
comes first, the rebuild's ledger sum or their settle (see server/storage/base.py).

While a restarted Redis is down, decisions follow ``budgetd.redis_down``: ``postgres`` keeps
deciding on the exact Postgres path (a bounded few errors while replicas switch), ``deny``
answers UNAVAILABLE and never allows.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from faultkit import (
    DEADLINE,
    assert_counters_match_ledger,
    assert_every_ok_in_ledger,
    live,
    start_load,
)
from replicas import create_team_and_key, start_replicas
from services import RedisServer, flush_redis

HOLD_TTL = 2.0
REPLICAS = 2
CONCURRENCY = 24
OUTAGE = 2.0


async def test_flushall_mid_load_rebuilds_counters_from_the_ledger_exactly(
    tmp_path: Path, database_url: str, own_redis: RedisServer
) -> None:
    started = time.monotonic()
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=own_redis.url, count=REPLICAS,
        reservation_ttl=HOLD_TTL,
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(cluster.replicas[0].stub, max_budget=1000.0)
        stop, running = start_load(live(cluster.replicas), key, concurrency=CONCURRENCY)
        await asyncio.sleep(1.0)
        # Many losses, each under full load: each one catches requests between their ledger
        # commit and their settle, racing the rebuilds of the counters they settle into.
        for _ in range(8):
            await flush_redis(own_redis.url, everything=True)
            await asyncio.sleep(0.4)
        await asyncio.sleep(0.6)
        stop.set()
        load = await running

        assert load.records["ok"] > 100, load.summary()
        # A flush loses nothing budgetd needs to answer: not one error.
        assert not load.errors, load.summary()
        await assert_every_ok_in_ledger(database_url, team_id, load)
        await assert_counters_match_ledger(
            cluster.replicas, own_redis.url, database_url, team_id, key, hold_ttl=HOLD_TTL
        )
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("policy", ["postgres", "deny"])
async def test_redis_restart_mid_load_follows_the_policy_then_rebuilds_exactly(
    policy: str, tmp_path: Path, database_url: str, own_redis: RedisServer
) -> None:
    started = time.monotonic()
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=own_redis.url, count=REPLICAS,
        reservation_ttl=HOLD_TTL, extra_env={"BUDGETD_REDIS_DOWN": policy},
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(cluster.replicas[0].stub, max_budget=1000.0)
        stop, running = start_load(live(cluster.replicas), key, concurrency=CONCURRENCY)
        await asyncio.sleep(1.5)
        down = time.monotonic()
        await own_redis.stop()  # every key is lost; the port stays ours
        await asyncio.sleep(OUTAGE)
        up = time.monotonic()
        await own_redis.start()  # empty
        await asyncio.sleep(2.0)
        stop.set()
        load = await running

        print(policy, load.summary())
        assert load.slowest < DEADLINE, "an answer took longer than the client's deadline"
        codes = load.error_codes()
        assert set(codes) <= {"UNAVAILABLE"}, load.summary()
        # Decisions came back after Redis did.
        assert load.allowed_between(up + 1.0, time.monotonic()) > 0, load.summary()
        if policy == "postgres":
            # The exact Postgres path kept deciding through the outage; the errors are the
            # few calls caught by the switch itself.
            assert load.allowed_between(down + 0.5, up) > 20, load.summary()
            assert codes["UNAVAILABLE"] <= 2 * CONCURRENCY, load.summary()
        else:
            # Fail closed: nothing admitted while Redis was down (0.5 s for calls in flight).
            assert load.allowed_between(down + 0.5, up) == 0, load.summary()
            assert codes["UNAVAILABLE"] > 0, load.summary()
        await assert_every_ok_in_ledger(database_url, team_id, load)
        await assert_counters_match_ledger(
            cluster.replicas, own_redis.url, database_url, team_id, key, hold_ttl=HOLD_TTL
        )
    assert time.monotonic() - started < 60
