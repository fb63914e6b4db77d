"""``make soak``: mixed load on three replicas with faults injected on a timer, then the truth.

Three ``budgetd serve`` replicas share a throwaway Postgres and Redis started here. Several
teams with one-minute budgets are driven continuously (CheckBudget with an estimate, then
RecordSpend of a cost no larger), while every ``--fault-every`` seconds the next fault of a
rotation hits: a replica killed with SIGKILL and restarted, Redis restarted empty, Postgres
stopped for a few seconds, Redis flushed. At the end the load stops, spools drain, holds of
unanswered requests expire, and one line reports what happened:

    soak: 600s requests=… admitted=… denied=… errors=… faults=… lost=0
          max_overspend=… (bound …) drift=0

``lost``: RecordSpends answered OK that are not in the ledger exactly once (must be 0).
``max_overspend``: the most any team's settled spend in one window went over its budget (the
``cross_once`` rule allows one request's estimate). ``drift``: |counters - ledger| over every
team and key in the current window, read through budgetd's admin API (must be 0).

Run: ``make soak`` (10 minutes) or ``.venv/bin/python tests/soak.py --duration 120``. The
short form runs in ``make test`` (tests/test_soak.py, 60 s). Loopback only; it stops itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
for extra in (HERE, HERE / "faults"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import asyncpg  # noqa: E402

from faultkit import FaultLoad, live, start_load  # noqa: E402
from harness import ADMIN  # noqa: E402
from replicas import (  # noqa: E402
    Cluster,
    create_team_and_key,
    kill_replica,
    relaunch_replica,
    start_replicas,
)
from server.gen.budgetd.v1 import budgetd_pb2 as pb  # noqa: E402
from server.money import decimal_to_nanos  # noqa: E402
from services import PostgresServer, RedisServer, flush_redis  # noqa: E402

TEAMS = 3
BUDGET_MICROS = 20_000  # 0.02 USD per team per minute
LARGEST_ESTIMATE_MICROS = 100  # faultkit's estimates are 10..100 micro-USD
HOLD_TTL = 2.0
CONCURRENCY_PER_TEAM = 6
FAULTS = ("kill_9_replica", "restart_redis", "postgres_outage", "flush_redis")


@dataclass
class SoakReport:
    """What a soak run saw; ``ok`` when nothing was lost, drift is 0 and overspend bounded."""

    seconds: float
    requests: int = 0
    admitted: int = 0
    denied: int = 0
    errors: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    max_overspend_nanos: int = 0
    bound_nanos: int = LARGEST_ESTIMATE_MICROS * 1000
    drift_nanos: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.drift_nanos == 0
            and self.max_overspend_nanos <= self.bound_nanos
            and self.admitted > 0
        )

    def line(self) -> str:
        faults = ",".join(f"{name}x{count}" for name, count in sorted(self.faults.items()))
        return (
            f"soak: {self.seconds:.0f}s requests={self.requests} admitted={self.admitted}"
            f" denied={self.denied} errors={self.errors} faults={faults or 'none'}"
            f" lost={self.lost} max_overspend={self.max_overspend_nanos / 1e9:.6f}"
            f" (bound {self.bound_nanos / 1e9:.6f}) drift={self.drift_nanos / 1e9:.9f}"
            f" {'OK' if self.ok else 'FAILED'}"
        )


async def soak(duration: float, fault_every: float, workdir: Path) -> SoakReport:
    """Run the soak for ``duration`` seconds of load; return its report."""
    started = time.monotonic()
    report = SoakReport(seconds=duration)
    async with PostgresServer() as pg, RedisServer() as redis:
        database_url = await pg.create_database("budgetd_soak")
        async with start_replicas(
            workdir, database_url=database_url, redis_url=redis.url, count=3,
            reservation_ttl=HOLD_TTL,
        ) as cluster:  # fmt: skip
            stub = cluster.replicas[0].stub
            teams = [
                await create_team_and_key(
                    stub, max_budget=BUDGET_MICROS / 1e6, budget_duration="1m"
                )
                for _ in range(TEAMS)
            ]
            loads = [
                start_load(live(cluster.replicas), key, concurrency=CONCURRENCY_PER_TEAM,
                           seed=f"soak-{i}")
                for i, (_, key) in enumerate(teams)
            ]  # fmt: skip
            await _inject_faults(cluster, pg, redis, duration, fault_every, report)
            for stop, _ in loads:
                stop.set()
            results = [await running for _, running in loads]
            await _quiesce(cluster, workdir)
            for (team_id, key), load in zip(teams, results, strict=True):
                _count(report, load)
                report.lost += await _lost(database_url, team_id, load)
                report.max_overspend_nanos = max(
                    report.max_overspend_nanos, await _overspend(database_url, team_id)
                )
                report.drift_nanos += await _drift(cluster, database_url, team_id, key)
    report.seconds = time.monotonic() - started
    return report


async def _inject_faults(
    cluster: Cluster,
    pg: PostgresServer,
    redis: RedisServer,
    duration: float,
    fault_every: float,
    report: SoakReport,
) -> None:
    deadline = time.monotonic() + duration
    rotation = itertools.cycle(FAULTS)
    victims = itertools.cycle(range(len(cluster.replicas)))
    while time.monotonic() + fault_every < deadline:
        await asyncio.sleep(fault_every)
        fault = next(rotation)
        report.faults[fault] += 1
        if fault == "kill_9_replica":
            victim = next(victims)
            await kill_replica(cluster, victim)
            await asyncio.sleep(1.0)
            await relaunch_replica(cluster, victim)
        elif fault == "restart_redis":
            await redis.restart()
        elif fault == "postgres_outage":
            await pg.halt()
            await asyncio.sleep(3.0)
            await pg.start()
        else:
            await flush_redis(redis.url, everything=True)
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


async def _quiesce(cluster: Cluster, workdir: Path) -> None:
    """Wait for every spool to drain and every hold of an unanswered request to expire."""
    limit = time.monotonic() + 60
    while any(_spooled(workdir / f"data-{i}") for i in range(len(cluster.replicas))):
        if time.monotonic() > limit:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(HOLD_TTL + 0.5)


def _spooled(data_dir: Path) -> int:
    return sum(
        len(path.read_text().splitlines())
        for path in (data_dir / "spool").glob("*.jsonl")
        if path.name != "conflicts.jsonl"
    )


def _count(report: SoakReport, load: FaultLoad) -> None:
    report.requests += sum(load.checks.values())
    report.admitted += load.checks["allowed"]
    report.denied += load.checks["denied"]
    report.errors += len(load.errors)


async def _lost(database_url: str, team_id: str, load: FaultLoad) -> int:
    """Acknowledged spends missing from the ledger (or there with another cost)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, cost FROM spend_ledger WHERE team_id = $1", team_id
        )
    finally:
        await conn.close()
    ledger = {row["request_id"]: decimal_to_nanos(row["cost"]) for row in rows}
    return sum(1 for rid, cost in load.recorded.items() if ledger.get(rid) != cost)


async def _overspend(database_url: str, team_id: str) -> int:
    """The most the team's settled spend in one minute window went over its budget."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT COALESCE(MAX(total), 0) AS worst FROM (SELECT SUM(cost) AS total"
            " FROM spend_ledger WHERE team_id = $1"
            " GROUP BY date_trunc('minute', admitted_at AT TIME ZONE 'UTC')) AS windows",
            team_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return max(0, decimal_to_nanos(row["worst"]) - BUDGET_MICROS * 1000)


async def _drift(cluster: Cluster, database_url: str, team_id: str, key: str) -> int:
    """|counter - ledger| of the team and its key in the current window, via every replica."""
    drift = 0
    conn = await asyncpg.connect(database_url)
    try:
        for replica in cluster.replicas:
            stub = replica.stub
            team = await stub.GetTeam(pb.GetTeamRequest(team_id=team_id), metadata=ADMIN)
            info = await stub.GetKey(pb.GetKeyRequest(key=key), metadata=ADMIN)
            end = team.budget_reset_at.ToSeconds()
            ledger_team = await _window_sum(conn, "team_id", team_id, end)
            ledger_key = await _window_sum(conn, "key_id", info.key_id, end)
            drift += abs(round(team.spend * 1e9) - ledger_team)
            drift += abs(round(info.spend * 1e9) - ledger_key)
    finally:
        await conn.close()
    return drift


async def _window_sum(conn: asyncpg.Connection, column: str, value: str, end: int) -> int:
    if column == "key_id":  # the key has no window of its own: its spend is all-time
        query = "SELECT COALESCE(SUM(cost), 0) FROM spend_ledger WHERE key_id = $1"
        total = await conn.fetchval(query, value)
    else:
        query = (
            "SELECT COALESCE(SUM(cost), 0) FROM spend_ledger WHERE team_id = $1"
            " AND admitted_at >= to_timestamp($2) AND admitted_at < to_timestamp($3)"
        )
        total = await conn.fetchval(query, value, end - 60, end)
    return decimal_to_nanos(total)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--fault-every", type=float, default=15.0, help="seconds between faults")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="budgetd-soak-") as workdir:
        report = asyncio.run(soak(args.duration, args.fault_every, Path(workdir)))
    print(report.line())
    return 0 if report.ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
