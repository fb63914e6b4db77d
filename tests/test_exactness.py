"""Money exactness at scale: a million spends of 1e-7 USD are exactly 0.1 USD, everywhere."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from harness import BACKENDS, Backend, backend_urls, make_settings, open_backend
from server.admin import NewKey, NewTeam
from server.authority import SpendRequest
from server.config import Settings
from server.storage.base import ScopeBudget, ScopeKind
from server.storage.memory_counters import MemoryCounters
from server.storage.redis_counters import RedisCounters
from server.windows import ALL_TIME

MILLION = 1_000_000
TENTH_OF_A_DOLLAR = 100_000_000  # nano-USD


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, **urls)


@pytest.fixture
async def backend(backend_settings: tuple[str, Settings]) -> AsyncIterator[Backend]:
    async with open_backend(*backend_settings) as b:
        yield b


async def bulk_insert_spends(b: Backend, team_id: str, key_id: str, count: int) -> None:
    """Write ``count`` ledger rows of 1e-7 USD straight into the database (fast)."""
    at = b.clock.now() - 1
    if b.settings.database_url:
        conn = await asyncpg.connect(b.settings.database_url)
        try:
            await conn.execute(
                "INSERT INTO spend_ledger (request_id, team_id, key_id, cost, admitted_at,"
                " recorded_at) SELECT 'bulk-' || g, $1, $2, 0.0000001, to_timestamp($3),"
                " to_timestamp($3) FROM generate_series(1, $4) AS g",
                team_id, key_id, at, count,
            )  # fmt: skip
        finally:
            await conn.close()
        return

    def insert() -> None:
        with sqlite3.connect(b.settings.data_dir / "budgetd.sqlite3") as conn:
            conn.execute(
                "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < ?)"
                " INSERT INTO spend_ledger (request_id, team_id, key_id, cost_nanos, admitted_at,"
                " recorded_at) SELECT 'bulk-' || x, ?, ?, 100, ?, ? FROM g",
                (count, team_id, key_id, at, at),
            )

    await asyncio.to_thread(insert)


async def test_a_million_spends_of_1e7_are_exactly_0_1_in_the_ledger_and_the_counters(
    backend: Backend,
) -> None:
    team = await backend.admin.create_team(NewTeam(team_alias="exact", budget_duration="1d"))
    key = await backend.admin.issue_key(NewKey(team_id=team.team.team_id))
    await bulk_insert_spends(backend, team.team.team_id, key.view.key.key_id, MILLION - 1)
    # The millionth spend goes through RecordSpend, the way a gateway records it.
    await backend.lose_counters()
    result = await backend.authority.record(
        SpendRequest(request_id="the-millionth", api_key=key.plaintext, cost=1e-7)
    )

    ledger = await backend.records.sum_spend(ScopeKind.TEAM, team.team.team_id, 0, None)
    assert ledger == TENTH_OF_A_DOLLAR
    assert result.team_spend_nanos == TENTH_OF_A_DOLLAR
    assert result.key_spend_nanos == TENTH_OF_A_DOLLAR
    assert (await backend.admin.get_team(team.team.team_id)).spend_nanos == TENTH_OF_A_DOLLAR


async def test_a_million_settles_of_100_nanos_in_process_counters_are_exact() -> None:
    counters = MemoryCounters()
    scope = ScopeBudget(ScopeKind.TEAM, "t", None, "", ALL_TIME)
    await counters.init("t", [(scope, 0)], 0.0)
    for i in range(MILLION):
        await counters.settle("t", "", [scope], 100, f"r{i}", 1.0, 60.0)
    assert (await counters.read("t", [scope], 1.0))[0] is not None
    state = (await counters.read("t", [scope], 1.0))[0]
    assert state is not None and state.spend == TENTH_OF_A_DOLLAR


async def test_many_concurrent_settles_in_redis_are_exact(redis_url: str) -> None:
    counters = RedisCounters(redis_url)
    await counters.start()
    try:
        scope = ScopeBudget(ScopeKind.TEAM, "t", None, "", ALL_TIME)
        await counters.init("t", [(scope, 0)], 0.0)
        count, batch = 20_000, 1_000
        for start in range(0, count, batch):
            await asyncio.gather(
                *(
                    counters.settle("t", "", [scope], 100, f"r{i}", 1.0, 60.0)
                    for i in range(start, start + batch)
                )
            )
        state = (await counters.read("t", [scope], 1.0))[0]
        assert state is not None and state.spend == count * 100
    finally:
        await counters.close()
