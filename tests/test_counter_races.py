"""The races a Redis loss or a crash opens between a ledger commit and its counter settle.

Each test stages one interleaving deterministically, on real Postgres and Redis (and the
Cluster), by hooking the counter store at the exact step where the race happens. The fault
tests in tests/faults/ hit the same races by chance under load; here each one is certain.

1. The counters vanish after a request's commit, and a rebuild sums the ledger *after* that
   commit, before the request settles: the rebuilt counter already has the cost, the settle
   must not add it again (the counter's ledger snapshot sees the row's transaction).
2. A rebuild sums the ledger *before* a request's commit and creates the counter *after*
   that request found it missing and settled: the cost must come in with the rebuild (it was
   parked by the settle).
3. budgetd dies between a request's commit and its settle: the counters must catch up
   (the settle was announced; the next decision of the team settles it from the ledger).
4. A replica that decided on Postgres while Redis was unreachable forgets the team's
   counters when Redis answers again, while another replica's rebuild has summed the ledger
   without that replica's spend: the stale rebuild must not create the counters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harness import Backend, backend_urls, make_settings, open_backend
from server.admin import NewKey, NewTeam
from server.authority import CheckRequest, SpendRequest
from server.config import Settings
from server.storage.base import LedgerEntry
from server.storage.redis_counters import RedisCounters

COST = 0.001  # USD
NANOS = 1_000_000


@pytest.fixture(params=["postgres_redis", "postgres_redis_cluster"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    """The backend's name and settings (a sync fixture, so it may start the services)."""
    return request.param, make_settings(tmp_path, **backend_urls(request, request.param))


@pytest.fixture
async def backend(backend_settings: tuple[str, Settings]) -> AsyncIterator[Backend]:
    async with open_backend(*backend_settings) as b:
        yield b


async def team_with_one_spend(b: Backend) -> tuple[str, str]:
    team = await b.admin.create_team(NewTeam(team_alias="race", max_budget=100.0))
    key = (await b.admin.issue_key(NewKey(team_id=team.team.team_id))).plaintext
    await b.authority.record(SpendRequest(request_id="r0", api_key=key, cost=COST))
    return team.team.team_id, key


async def spend(b: Backend, team_id: str) -> int:
    return (await b.admin.get_team(team_id)).spend_nanos


Step = Callable[..., Awaitable[Any]]


def before_next_settle(
    b: Backend, monkeypatch: pytest.MonkeyPatch, step: Callable[[Step], Awaitable[Any]]
) -> None:
    """Run ``step(settle)`` in place of the next settle (``settle`` is the real one)."""
    real: Step = b.counters.settle

    async def settle(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(b.counters, "settle", real)  # once
        return await step(lambda: real(*args, **kwargs))

    monkeypatch.setattr(b.counters, "settle", settle)


async def test_a_rebuild_after_the_commit_is_not_added_to_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    team_id, key = await team_with_one_spend(backend)

    async def flush_then_rebuild(settle: Step) -> Any:
        await backend.lose_counters()
        await backend.authority.check(CheckRequest(api_key=key))  # rebuilds: sums r0 and r1
        return await settle()

    before_next_settle(backend, monkeypatch, flush_then_rebuild)
    await backend.authority.record(SpendRequest(request_id="r1", api_key=key, cost=COST))

    assert await spend(backend, team_id) == 2 * NANOS


async def test_a_rebuild_that_summed_before_the_commit_takes_in_the_parked_cost(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    team_id, key = await team_with_one_spend(backend)
    await backend.lose_counters()
    summed, go_on = asyncio.Event(), asyncio.Event()
    real_init: Step = backend.counters.init

    async def slow_init(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(backend.counters, "init", real_init)  # only the check's rebuild
        summed.set()
        await go_on.wait()  # the sums are read; the counters are created only later
        return await real_init(*args, **kwargs)

    monkeypatch.setattr(backend.counters, "init", slow_init)
    check = asyncio.ensure_future(backend.authority.check(CheckRequest(api_key=key)))
    await summed.wait()  # the check's rebuild has summed r0 only

    async def lose_then_settle(settle: Step) -> Any:
        await backend.lose_counters()  # the request's own rebuild is lost again
        result = await settle()  # its counters are missing: the cost is parked
        go_on.set()
        await check  # the stale rebuild creates the counters now
        return result

    before_next_settle(backend, monkeypatch, lose_then_settle)
    await backend.authority.record(SpendRequest(request_id="r1", api_key=key, cost=COST))

    assert await spend(backend, team_id) == 2 * NANOS


async def test_a_request_whose_budgetd_died_before_its_settle_is_settled_later(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    team_id, key = await team_with_one_spend(backend)

    async def die(settle: Step) -> Any:
        raise SystemExit("killed between the ledger commit and the settle")

    before_next_settle(backend, monkeypatch, die)
    with pytest.raises(SystemExit):
        await backend.authority.record(SpendRequest(request_id="r1", api_key=key, cost=COST))
    assert await spend(backend, team_id) == NANOS  # the ledger has r1, the counters do not

    backend.clock.advance(31)  # the settle is overdue (min(reservation_ttl, 30 s))
    await backend.authority.check(CheckRequest(api_key=key))  # the team's next decision
    assert await spend(backend, team_id) == 2 * NANOS
    backend.clock.advance(60)
    await backend.authority.check(CheckRequest(api_key=key))  # and only once
    assert await spend(backend, team_id) == 2 * NANOS


async def test_a_rebuild_that_summed_before_another_replica_forgot_the_counters_sums_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    team_id, key = await team_with_one_spend(backend)
    await backend.lose_counters()
    summed, go_on = asyncio.Event(), asyncio.Event()
    real_init: Step = backend.counters.init

    async def slow_init(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(backend.counters, "init", real_init)  # only the first attempt
        summed.set()
        await go_on.wait()
        return await real_init(*args, **kwargs)

    monkeypatch.setattr(backend.counters, "init", slow_init)
    check = asyncio.ensure_future(backend.authority.check(CheckRequest(api_key=key)))
    await summed.wait()  # this replica's rebuild has summed r0 only
    # Another replica, deciding on Postgres while it could not reach Redis, wrote r1 to the
    # ledger only, and now that Redis answers it again forgets the team's counters.
    decided = await backend.authority.check(CheckRequest(api_key=key))
    elsewhere = LedgerEntry(
        "r1", team_id, decided.key_id, NANOS, backend.clock.now(), backend.clock.now()
    )
    assert (await backend.records.insert_spend(elsewhere)).inserted
    assert isinstance(backend.counters, RedisCounters)
    await backend.counters.forget_teams([team_id])
    go_on.set()
    await check

    assert await spend(backend, team_id) == 2 * NANOS
