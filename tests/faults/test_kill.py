"""budgetd killed (-9) mid-load (DESIGN §8, §10 invariant 2).

Three replicas share one Postgres and one Redis; one is SIGKILLed while cycles are in flight
on it, and started again on the same data directory. A RecordSpend is acknowledged only
after its ledger row is committed, so every OK must be in the ledger after the crash; the
holds the dead replica's requests left behind count until ``reservation_ttl`` and then
expire, giving their headroom back.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from faultkit import (
    DEADLINE,
    assert_counters_match_ledger,
    assert_every_ok_in_ledger,
    live,
    start_load,
)
from replicas import (
    NANOS_PER_MICRO,
    create_team_and_key,
    kill_replica,
    redis_counters,
    relaunch_replica,
    start_replicas,
)
from server.gen.budgetd.v1 import budgetd_pb2 as pb

HOLD_TTL = 3.0
VICTIM = 1
ORPHANS = 5  # holds placed on the victim by requests that never record (it dies first)
ORPHAN_MICROS = 1000


async def test_kill_9_mid_load_loses_no_acknowledged_spend_and_orphaned_holds_expire(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    started = time.monotonic()
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=redis_url, count=3,
        reservation_ttl=HOLD_TTL,
    ) as cluster:  # fmt: skip
        team_id, key = await create_team_and_key(cluster.replicas[0].stub, max_budget=1000.0)
        stop, running = start_load(live(cluster.replicas), key, concurrency=24)
        await asyncio.sleep(1.5)
        victim = cluster.replicas[VICTIM]
        for _ in range(ORPHANS):  # requests in flight on the victim when it dies
            answer = await victim.stub.CheckBudget(
                pb.CheckBudgetRequest(api_key=key, estimated_cost=ORPHAN_MICROS / 1e6),
                timeout=DEADLINE,
            )
            assert answer.allowed
        killed = time.monotonic()
        await kill_replica(cluster, VICTIM)
        assert victim.process.returncode == -9
        # The dead requests' holds still count (nothing can release them but their expiry).
        held = {held for _, held in (await redis_counters(redis_url, team_id)).values()}
        assert min(held) >= ORPHANS * ORPHAN_MICROS * NANOS_PER_MICRO, held
        await asyncio.sleep(1.0)
        relaunching = time.monotonic()
        await relaunch_replica(cluster, VICTIM)
        relaunched = time.monotonic()
        await asyncio.sleep(1.0)
        stop.set()
        load = await running

        assert load.records["ok"] > 100, load.summary()
        # The only errors are the calls in flight on the victim when it died (or sent to it
        # just after), and they came at once: the other replicas did not notice.
        elsewhere = [e for e in load.errors if not e[1].endswith(f"@replica-{VICTIM}")]
        assert not elsewhere, (elsewhere[:5], killed, relaunching, relaunched)
        assert set(load.error_codes()) <= {"UNAVAILABLE"}, load.summary()
        assert len(load.errors) <= 2 * 24, load.summary()
        await assert_every_ok_in_ledger(database_url, team_id, load)
        # Once reservation_ttl has passed the dead holds are gone: counters == ledger, 0 held.
        await assert_counters_match_ledger(
            cluster.replicas, redis_url, database_url, team_id, key, hold_ttl=HOLD_TTL
        )
    assert time.monotonic() - started < 60
