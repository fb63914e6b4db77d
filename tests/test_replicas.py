"""Invariant 1 of DESIGN §10 across three real ``budgetd serve`` replicas.

Three processes share one Postgres and one Redis; hundreds of concurrent CheckBudget ->
RecordSpend cycles with estimates >= actual costs are spread over them round-robin, against
a team whose budget runs out midway. Whatever the interleaving:

* ``never_exceed``: settled spend never exceeds ``max_budget``;
* ``cross_once``: settled spend stays below ``max_budget`` + the largest estimate. Holds
  count in ``cross_once`` too (admit while ``spend + held < max_budget``), so however many
  requests are in flight, ``spend + held`` only grows at an admission made below the line,
  by that request's estimate; settling replaces an estimate by an actual cost no larger.
  So the bound is one request's estimate, not one per request in flight;
* without estimates nothing is held, so every request in flight when the line is crossed
  may complete: ``cross_once`` then only bounds spend by ``max_budget`` + (requests in
  flight) x (the largest cost). That case is here too, to show what the bound depends on;
* holds are released (the team reaches at least 90 % of its budget, and no counter is left
  holding anything);
* every RecordSpend answered OK is in the ledger exactly once, and the Redis counters equal
  the ledger's sums.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from harness import ADMIN
from replicas import (
    NANOS_PER_MICRO,
    Cluster,
    LoadResult,
    create_team_and_key,
    drive_load,
    ledger_rows,
    ledger_sum,
    redis_counters,
    start_replicas,
)
from server.gen.budgetd.v1 import budgetd_pb2 as pb

REPLICAS = 3
CYCLES = 600
CONCURRENCY = 64
# Budget 0.01 USD against estimates of 0.00005-0.0001 USD (actual costs half that on
# average): about 270 admitted requests exhaust it, well before the 600 cycles end.
MAX_BUDGET_MICROS = 10_000
ESTIMATE_MICROS = (50, 100)
# After the main run, rounds of CONCURRENCY cycles continue until one admits nothing, so
# headroom freed by settling (estimate minus actual cost) is used up; at most this many.
TOP_UP_ROUNDS = 30


async def run_until_exhausted(
    cluster: Cluster, key: str, rng: random.Random, *, send_estimate: bool
) -> LoadResult:
    """The main concurrent run, then top-up rounds until the budget admits nothing more."""
    result = await drive_load(
        cluster.replicas, key, cycles=CYCLES, concurrency=CONCURRENCY,
        estimate_micros=ESTIMATE_MICROS, rng=rng, send_estimate=send_estimate,
    )  # fmt: skip
    for _ in range(TOP_UP_ROUNDS):
        admitted = result.admitted
        await drive_load(
            cluster.replicas, key, cycles=CONCURRENCY, concurrency=CONCURRENCY,
            estimate_micros=ESTIMATE_MICROS, rng=rng, send_estimate=send_estimate,
            result=result,
        )  # fmt: skip
        if result.admitted == admitted:
            break
    return result


async def assert_ledger_matches_answers(database_url: str, team_id: str, result: LoadResult) -> int:
    """Every OK RecordSpend is in the ledger exactly once and nothing else is; the sum."""
    count, total = await ledger_sum(database_url, team_id)
    assert count == len(result.recorded)
    assert total == result.recorded_total
    assert await ledger_rows(database_url, team_id) == result.recorded
    return total


async def assert_counters_match_ledger(
    cluster: Cluster, redis_url: str, team_id: str, key: str, ledger_total: int
) -> None:
    """Redis counters (read directly and through GetTeam on every replica) equal the ledger."""
    counters = await redis_counters(redis_url, team_id)
    assert counters, "the load left no counters in Redis"
    # The team's counter and the key's (all-time windows): the ledger's sum, nothing held.
    assert sorted(counters.values()) == [(ledger_total, 0), (ledger_total, 0)], counters
    for replica in cluster.replicas:
        team = await replica.stub.GetTeam(pb.GetTeamRequest(team_id=team_id), metadata=ADMIN)
        assert round(team.spend * 1e9) == ledger_total
        got = await replica.stub.GetKey(pb.GetKeyRequest(key=key), metadata=ADMIN)
        assert round(got.spend * 1e9) == ledger_total


@pytest.mark.parametrize(
    ("enforcement", "send_estimate"),
    [("never_exceed", True), ("cross_once", True), ("cross_once", False)],
    ids=["never_exceed", "cross_once", "cross_once-without-estimates"],
)
async def test_replicas_under_concurrent_load_keep_spend_within_the_budget_bound(
    enforcement: str, send_estimate: bool, tmp_path: Path, database_url: str, redis_url: str
) -> None:
    rng = random.Random(f"replicas-{enforcement}-{send_estimate}")
    max_budget = MAX_BUDGET_MICROS * NANOS_PER_MICRO
    started = time.monotonic()
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=redis_url, count=REPLICAS,
        enforcement=enforcement, reservation_ttl=60.0,
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(
            cluster.replicas[0].stub, max_budget=MAX_BUDGET_MICROS / 1e6
        )
        result = await run_until_exhausted(cluster, key, rng, send_estimate=send_estimate)

        assert not result.errors, result.errors[:5]
        assert result.cycles >= CYCLES and result.max_in_flight == CONCURRENCY
        assert result.denied > 0, "the budget was never exhausted: the test proves nothing"
        spend = await assert_ledger_matches_answers(database_url, team_id, result)
        if not send_estimate:
            assert spend < max_budget + result.max_in_flight * result.largest_cost
        elif enforcement == "never_exceed":
            assert spend <= max_budget
        else:
            assert spend < max_budget + result.largest_estimate
        print(
            enforcement,
            spend,
            max_budget,
            result.cycles,
            result.admitted,
            result.denied,
            result.largest_estimate,
            result.max_in_flight,
            time.monotonic() - started,
        )
        # No phantom consumption: released holds give their headroom back.
        assert spend >= max_budget * 9 // 10, (spend, result)
        await assert_counters_match_ledger(cluster, redis_url, team_id, key, spend)
    assert cluster.returncodes == [0] * REPLICAS, "a replica did not drain and exit cleanly"
    assert time.monotonic() - started < 60


async def test_replicas_on_a_three_master_redis_cluster_keep_the_same_bounds(
    tmp_path: Path, database_url: str, redis_cluster_url: str
) -> None:
    """The same Lua scripts, keys hash-tagged per team, on a 3-master Redis Cluster."""
    rng = random.Random("replicas-cluster")
    max_budget = MAX_BUDGET_MICROS * NANOS_PER_MICRO
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=redis_cluster_url, count=REPLICAS,
        enforcement="never_exceed", reservation_ttl=60.0,
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(
            cluster.replicas[0].stub, max_budget=MAX_BUDGET_MICROS / 1e6
        )
        result = await run_until_exhausted(cluster, key, rng, send_estimate=True)

        assert not result.errors, result.errors[:5]
        assert result.denied > 0, "the budget was never exhausted: the test proves nothing"
        spend = await assert_ledger_matches_answers(database_url, team_id, result)
        assert max_budget * 9 // 10 <= spend <= max_budget
        # The cluster's counters, read through every replica, equal the ledger.
        for replica in cluster.replicas:
            team = await replica.stub.GetTeam(pb.GetTeamRequest(team_id=team_id), metadata=ADMIN)
            assert round(team.spend * 1e9) == spend
    assert cluster.returncodes == [0] * REPLICAS
