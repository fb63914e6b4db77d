"""Network faults between budgetd and its backends, through a TCP fault proxy.

The replicas reach Redis or Postgres only through a :class:`~proxy.FaultProxy`; the test
cuts every connection open through it and refuses new ones for a while, mid-load, while
the backend itself keeps running (the test reads it directly). Every call must still be
answered within the client's deadline, the way the policy says:

* Redis cut, ``redis_down: postgres``: decisions go on, exact, on the Postgres path;
  ``deny``: CheckBudget answers UNAVAILABLE and never allows;
* Postgres cut, ``postgres_down: spool``: decisions go on from cached keys and Redis,
  RecordSpend is spooled and replayed after; ``deny``: RecordSpend answers UNAVAILABLE.

Afterwards every acknowledged RecordSpend is in the ledger exactly once and the Redis
counters equal the ledger's sums.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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
from proxy import FaultProxy
from replicas import create_team_and_key, ledger_rows, start_replicas
from server.gen.budgetd.v1 import budgetd_pb2 as pb

HOLD_TTL = 2.0
CONCURRENCY = 16
OUTAGE = 2.0


def via(url: str, proxy: FaultProxy) -> str:
    """``url`` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{proxy.address}" if credentials else proxy.address
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def spooled(workdir: Path) -> int:
    return spooled_rows(*workdir.glob("data-*"))


@pytest.mark.parametrize("backend", ["redis", "postgres"])
async def test_cut_mid_load_every_call_is_answered_in_time_and_nothing_is_lost(
    backend: str, tmp_path: Path, database_url: str, redis_url: str
) -> None:
    started = time.monotonic()
    broken = redis_url if backend == "redis" else database_url
    async with (
        FaultProxy(*target(broken)) as proxy,
        start_replicas(
            tmp_path,
            database_url=via(database_url, proxy) if backend == "postgres" else database_url,
            redis_url=via(redis_url, proxy) if backend == "redis" else redis_url,
            count=2,
            reservation_ttl=HOLD_TTL,
            # Shorter than the cut: keys and teams come from entries past their TTL.
            extra_env={"BUDGETD_RECORD_CACHE_TTL": "0.5"},
        ) as cluster,
    ):
        team_id, key = await create_team_and_key(cluster.replicas[0].stub, max_budget=1000.0)
        stop, running = start_load(live(cluster.replicas), key, concurrency=CONCURRENCY)
        await asyncio.sleep(1.5)
        down = time.monotonic()
        proxy.block()
        assert proxy.cut() > 0
        await asyncio.sleep(OUTAGE)
        # Spend acknowledged during a Postgres cut is on the replicas' disks, nowhere else.
        cut_off = spooled(tmp_path)
        assert cut_off > 0 if backend == "postgres" else cut_off == 0
        up = time.monotonic()
        proxy.unblock()
        await asyncio.sleep(2.0)
        stop.set()
        load = await running

        print(backend, load.summary(), proxy.refused)
        assert proxy.refused > 0, "nothing tried the backend during the cut"
        # Every call was answered within its deadline, and decisions went on through
        # the cut (on Postgres, or from the cache and Redis).
        assert load.slowest < DEADLINE, load.summary()
        assert load.allowed_between(down + 0.5, up) > 20, load.summary()
        assert load.recorded_between(down + 0.5, up) > 20, load.summary()
        assert set(load.error_codes()) <= {"UNAVAILABLE"}, load.summary()
        assert len(load.errors) <= 2 * CONCURRENCY, load.summary()
        if backend == "postgres":
            deadline = time.monotonic() + 15
            while spooled(tmp_path):
                assert time.monotonic() < deadline, "the spools were not replayed"
                await asyncio.sleep(0.2)
        await assert_every_ok_in_ledger(database_url, team_id, load)
        await assert_counters_match_ledger(
            cluster.replicas, redis_url, database_url, team_id, key, hold_ttl=HOLD_TTL
        )
    assert time.monotonic() - started < 60


async def test_redis_down_with_deny_policy_answers_unavailable_never_allowed(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    async with FaultProxy(*target(redis_url)) as proxy, start_replicas(
        tmp_path, database_url=database_url, redis_url=via(redis_url, proxy), count=1,
        extra_env={"BUDGETD_REDIS_DOWN": "deny"},
    ) as cluster:  # fmt: skip
        stub = cluster.replicas[0].stub
        _, key = await create_team_and_key(stub, max_budget=1000.0)
        check = pb.CheckBudgetRequest(api_key=key, estimated_cost=0.001)
        assert (await stub.CheckBudget(check, timeout=DEADLINE)).allowed
        proxy.block()
        proxy.cut()
        for _ in range(20):
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                answer = await stub.CheckBudget(check, timeout=DEADLINE)
                raise AssertionError(f"answered while Redis is down: {answer}")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "redis" in (refused.value.details() or "")
            assert time.monotonic() - began < DEADLINE
        proxy.unblock()
        assert (await stub.CheckBudget(check, timeout=DEADLINE)).allowed


async def test_postgres_down_with_deny_policy_refuses_record_spend_and_spools_nothing(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    async with FaultProxy(*target(database_url)) as proxy, start_replicas(
        tmp_path, database_url=via(database_url, proxy), redis_url=redis_url, count=1,
        extra_env={"BUDGETD_POSTGRES_DOWN": "deny", "BUDGETD_RECORD_CACHE_TTL": "0"},
    ) as cluster:  # fmt: skip
        stub = cluster.replicas[0].stub
        team_id, key = await create_team_and_key(stub, max_budget=1000.0)
        decision = await stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=key, estimated_cost=0.001), timeout=DEADLINE
        )
        assert decision.allowed
        proxy.block()
        proxy.cut()
        spend = pb.RecordSpendRequest(
            request_id="during-outage", reservation_id=decision.reservation_id, cost=0.0005
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RecordSpend(spend, timeout=DEADLINE)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # No cached record may be used either (deny, and a cache TTL of 0).
        with pytest.raises(grpc.aio.AioRpcError) as unchecked:
            await stub.CheckBudget(pb.CheckBudgetRequest(api_key=key), timeout=DEADLINE)
        assert unchecked.value.code() == grpc.StatusCode.UNAVAILABLE
        assert spooled(tmp_path) == 0
        proxy.unblock()
        answer = await stub.RecordSpend(spend, timeout=DEADLINE)
        assert not answer.duplicate
        assert await ledger_rows(database_url, team_id) == {"during-outage": 500_000}
