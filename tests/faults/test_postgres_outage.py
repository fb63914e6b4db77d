"""Postgres stops mid-load and comes back (DESIGN §8: "Postgres down").

With ``budgetd.postgres_down: spool`` (the default) decisions carry on from the record cache
and Redis; each RecordSpend that cannot reach the ledger is appended to the replica's spool
on local disk and fsynced before it is acknowledged, and replayed into the ledger when
Postgres returns. The spool survives a crash: a replica killed (-9) while Postgres is down
replays it at its next start. Admin writes, and keys never seen by a replica, are refused
with UNAVAILABLE meanwhile, never guessed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from faultkit import (
    DEADLINE,
    assert_counters_match_ledger,
    assert_every_ok_in_ledger,
    live,
    spooled_rows,
    start_load,
)
from harness import ADMIN
from replicas import create_team_and_key, kill_replica, relaunch_replica, start_replicas
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from services import PostgresServer

HOLD_TTL = 2.0
# Shorter than the outage, so keys and teams are answered from entries past their TTL.
CACHE_TTL = 0.5
CONCURRENCY = 16
VICTIM = 1


async def wait_for_empty_spools(data_dirs: list[Path], within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while any(spooled_rows(d) for d in data_dirs):
        assert time.monotonic() < deadline, {str(d): spooled_rows(d) for d in data_dirs}
        await asyncio.sleep(0.2)


async def test_postgres_outage_mid_load_spools_acknowledged_spend_and_replays_it(
    tmp_path: Path, own_postgres: PostgresServer, redis_url: str
) -> None:
    started = time.monotonic()
    database_url = await own_postgres.create_database("budgetd_outage")
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=redis_url, count=2,
        reservation_ttl=HOLD_TTL, extra_env={"BUDGETD_RECORD_CACHE_TTL": str(CACHE_TTL)},
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(cluster.replicas[0].stub, max_budget=1000.0)
        stop, running = start_load(live(cluster.replicas), key, concurrency=CONCURRENCY)
        await asyncio.sleep(1.5)

        down = time.monotonic()
        await own_postgres.halt()
        await asyncio.sleep(1.0)
        healthy = cluster.replicas[0].stub
        # Admin writes need the source of truth; a key this replica never saw cannot be
        # checked: UNAVAILABLE, never a guess.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await healthy.CreateTeam(
                pb.CreateTeamRequest(team_alias="during-outage"), metadata=ADMIN, timeout=DEADLINE
            )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await healthy.CheckBudget(
                pb.CheckBudgetRequest(api_key="sk-never-seen-by-this-replica-0000"),
                timeout=DEADLINE,
            )
        assert unknown.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(1.0)
        # A crash while Postgres is down: what the victim acknowledged is only in its spool.
        victim_dir = tmp_path / f"data-{VICTIM}"
        await kill_replica(cluster, VICTIM)
        left_behind = spooled_rows(victim_dir)
        assert left_behind > 0, "the victim spooled nothing: the test proves nothing"
        await asyncio.sleep(0.5)

        up = time.monotonic()
        await own_postgres.start()
        await relaunch_replica(cluster, VICTIM)
        assert spooled_rows(victim_dir) == 0, "the relaunched replica did not replay at start"
        await asyncio.sleep(1.5)
        stop.set()
        load = await running

        print(load.summary(), left_behind)
        # Decisions and acknowledged spend kept coming while Postgres was down.
        assert load.allowed_between(down + 0.5, up) > 50, load.summary()
        assert load.recorded_between(down + 0.5, up) > 50, load.summary()
        assert load.slowest < DEADLINE, load.summary()
        assert set(load.error_codes()) <= {"UNAVAILABLE"}, load.summary()
        assert len(load.errors) <= 2 * CONCURRENCY, load.summary()

        await wait_for_empty_spools([tmp_path / f"data-{i}" for i in range(2)])
        await assert_every_ok_in_ledger(database_url, team_id, load)
        await assert_counters_match_ledger(
            cluster.replicas, redis_url, database_url, team_id, key, hold_ttl=HOLD_TTL
        )
    assert cluster.returncodes == [0, 0], "a replica did not stop cleanly (spool replay task)"
    assert time.monotonic() - started < 60
