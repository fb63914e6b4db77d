"""Counters on Postgres alone (the exact path while Redis is down), against a real Postgres.

Their semantics differ from the cache-like stores of tests/test_counters.py on purpose:
spend is the ledger's sum over the counter's window (so it is written through the record
store here), ``settle`` only releases the hold, ``init`` does nothing and no counter is ever
missing. Holds, the rule and expiry behave as in every store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from server.errors import RecordsUnavailable, Unavailable
from server.rules import Enforcement
from server.storage.base import CounterState, LedgerEntry, ReserveStatus, ScopeBudget, ScopeKind
from server.storage.postgres import PostgresRecords
from server.storage.postgres_counters import PostgresCounters, team_lock_id
from server.windows import Window

HOUR_END = 1_700_002_800
HOUR = Window(HOUR_END - 3600, HOUR_END)
NOW = HOUR.start + 100.0
LATER = NOW + 600
TEAM, KEY = "team-a", "key-a"
NEVER, CROSS = Enforcement.NEVER_EXCEED, Enforcement.CROSS_ONCE


def team_scope(limit: int | None) -> ScopeBudget:
    return ScopeBudget(ScopeKind.TEAM, TEAM, limit, "1h", HOUR)


def key_scope(limit: int | None) -> ScopeBudget:
    return ScopeBudget(ScopeKind.KEY, KEY, limit, "1h", HOUR)


@pytest.fixture
async def records(database_url: str) -> AsyncIterator[PostgresRecords]:
    store = PostgresRecords(database_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def counters(database_url: str, records: PostgresRecords) -> AsyncIterator[PostgresCounters]:
    store = PostgresCounters(database_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


async def spent(records: PostgresRecords, request_id: str, cost: int, at: float = NOW) -> None:
    entry = LedgerEntry(request_id, TEAM, KEY, cost, admitted_at=at, recorded_at=at)
    assert (await records.insert_spend(entry)).inserted


async def test_spend_is_the_ledgers_sum_over_the_window(
    records: PostgresRecords, counters: PostgresCounters
) -> None:
    await spent(records, "in-1", 30)
    await spent(records, "in-2", 12, at=HOUR_END - 0.000001)
    await spent(records, "before", 1000, at=HOUR.start - 1)
    await spent(records, "after", 1000, at=HOUR_END)

    states = await counters.read(TEAM, [key_scope(None), team_scope(None)], NOW)
    assert states == (CounterState(42, 0), CounterState(42, 0))
    await counters.init(TEAM, [(team_scope(None), 999)], NOW)  # nothing to rebuild
    assert await counters.read(TEAM, [team_scope(None)], NOW) == (CounterState(42, 0),)


async def test_reserve_applies_the_rule_to_every_scope_all_or_nothing(
    records: PostgresRecords, counters: PostgresCounters
) -> None:
    await spent(records, "a", 60)
    scopes = [key_scope(100), team_scope(1000)]

    fits = await counters.reserve(TEAM, scopes, 40, "r1", LATER, NOW, NEVER)
    too_much = await counters.reserve(TEAM, scopes, 1, "r2", LATER, NOW, NEVER)
    crossing = await counters.reserve(TEAM, [team_scope(101)], 500, "r3", LATER, NOW, CROSS)

    assert fits.status is ReserveStatus.RESERVED
    assert fits.states == (CounterState(60, 40), CounterState(60, 40))
    assert (too_much.status, too_much.denied_index) == (ReserveStatus.DENIED, 0)
    assert crossing.status is ReserveStatus.RESERVED  # cross_once: 60 + 40 < 101
    assert await counters.read(TEAM, scopes, NOW) == (CounterState(60, 40), CounterState(60, 540))


async def test_holds_are_replaced_expire_and_settle_releases_without_adding(
    records: PostgresRecords, counters: PostgresCounters
) -> None:
    team = team_scope(1000)
    await counters.reserve(TEAM, [team], 50, "r1", LATER, NOW, NEVER)
    await counters.reserve(TEAM, [team], 70, "r1", LATER, NOW, NEVER)  # replaces, not adds
    await counters.reserve(TEAM, [team], 5, "short", NOW + 10, NOW, NEVER)
    assert await counters.read(TEAM, [team], NOW) == (CounterState(0, 75),)
    assert await counters.read(TEAM, [team], NOW + 10) == (CounterState(0, 70),)

    # The caller writes the ledger row first; settling only drops the hold.
    await spent(records, "q1", 40)
    settled = await counters.settle(TEAM, "r1", [team], 40, "q1", NOW + 11, 60)
    assert (settled.applied, settled.states) == (True, (CounterState(40, 0),))
    again = await counters.settle(TEAM, "r1", [team], 40, "q1", NOW + 12, 60)
    assert again.states == (CounterState(40, 0),)  # idempotent: the ledger is the spend

    await counters.reserve(TEAM, [team], 9, "r2", LATER, NOW, NEVER)
    assert await counters.release(TEAM, "r2", NOW)
    assert not await counters.release(TEAM, "r2", NOW)
    assert not await counters.release(TEAM, "short", NOW + 20)  # expired: nothing to drop
    assert await counters.begin_settle(TEAM, [team], "q9", NOW, 10) == (CounterState(40, 0),)


async def test_replicas_reserving_at_once_never_overcommit(
    database_url: str, counters: PostgresCounters
) -> None:
    other = PostgresCounters(database_url)  # a second replica's store
    await other.start()
    try:
        team = team_scope(100)
        results = await asyncio.gather(
            *(
                (counters if i % 2 else other).reserve(TEAM, [team], 10, f"r{i}", LATER, NOW, NEVER)
                for i in range(30)
            )
        )
    finally:
        await other.close()
    assert sum(r.status is ReserveStatus.RESERVED for r in results) == 10
    assert await counters.read(TEAM, [team], NOW) == (CounterState(0, 100),)


async def test_an_outage_is_unavailable_but_not_a_record_store_outage() -> None:
    store = PostgresCounters("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(Unavailable) as caught:
        await store.start()
    assert not isinstance(caught.value, RecordsUnavailable)
    with pytest.raises(Unavailable) as unstarted:
        await store.read(TEAM, [team_scope(1)], NOW)
    assert not isinstance(unstarted.value, RecordsUnavailable)
    assert team_lock_id(TEAM) == team_lock_id(TEAM) != team_lock_id("team-b")
