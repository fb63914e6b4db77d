"""The record-store contract of issue 5 on both stores: SQLite and Postgres (and Postgres
behind the record cache).

Team and key controls, per-model budgets, team members, the JWT team upsert, the user of
each ledger row, member and model sums, and migration 0004 on a database that has data.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.errors import NotFound
from server.spool import decode, encode
from server.storage.base import (
    KeyRecord,
    LedgerEntry,
    MemberRecord,
    ModelBudget,
    RecordStore,
    ScopeKind,
    SpendGroup,
    SpendQuery,
    TeamRecord,
)
from server.storage.cached_records import CachedRecords
from server.storage.postgres import PostgresRecords
from server.storage.postgres_migrations import apply_migrations, load_migrations
from server.storage.snapshots import visible
from server.storage.sqlite import SqliteRecords
from server.storage.sqlite_schema import migration_files

NOW = 1_718_318_916.0  # 2024-06-13T22:48:36Z
HOUR = 3600.0
ONE_NANO = 1  # 1e-9 USD, the smallest budget
ODD = 123_456_000_000_001  # 123456.000000001 USD: more digits than a double holds
STORES = ("sqlite", "postgres", "postgres_cached")


@pytest.fixture(params=STORES)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """The store's name and where it lives (a sync fixture, so it may start Postgres)."""
    if request.param == "sqlite":
        return request.param, str(tmp_path / "records.sqlite3")
    return request.param, request.getfixturevalue("database_url")


@pytest.fixture
async def records(store_spec: tuple[str, str]) -> AsyncIterator[RecordStore]:
    name, where = store_spec
    store: RecordStore
    if name == "sqlite":
        store = SqliteRecords(Path(where))
    elif name == "postgres":
        store = PostgresRecords(where)
    else:  # ttl 0: every read goes through, so the cache must pass every call on exactly
        store = CachedRecords(PostgresRecords(where), ttl=0.0, serve_stale=False)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


def a_team(team_id: str = "team-1", **changes: Any) -> TeamRecord:
    team = TeamRecord(
        team_id=team_id,
        team_alias="QA Prod Bot",
        max_budget_nanos=ONE_NANO,
        budget_duration="1d",
        created_at=NOW,
    )
    return replace(team, **changes)


def a_key(key_id: str = "key-1", team_id: str = "team-1", **changes: Any) -> KeyRecord:
    key = KeyRecord(
        key_id=key_id,
        key_hash=f"hash-of-{key_id}",
        team_id=team_id,
        key_alias="",
        max_budget_nanos=None,
        budget_duration="",
        key_prefix="sk-abc",
        created_at=NOW,
    )
    return replace(key, **changes)


def spend(
    request_id: str,
    cost: int,
    *,
    team_id: str = "team-1",
    key_id: str = "key-1",
    user_id: str = "",
    model: str = "",
    at: float = NOW,
) -> LedgerEntry:
    return LedgerEntry(
        request_id=request_id,
        team_id=team_id,
        key_id=key_id,
        cost_nanos=cost,
        admitted_at=at,
        recorded_at=at + 1,
        model=model,
        user_id=user_id,
    )


MODEL_BUDGETS = {
    "gpt-4o": ModelBudget(ONE_NANO, "1d"),
    "llama3": ModelBudget(ODD, ""),
    "huge": ModelBudget(2**62, "1mo"),
}


# -- teams and keys: the new fields -------------------------------------------------------


async def test_new_team_fields_round_trip_exactly(records: RecordStore) -> None:
    team = a_team(
        soft_budget_nanos=ODD,
        member_budget_nanos=ONE_NANO,
        member_budget_duration="1h",
        member_rpm_limit=7,
        member_tpm_limit=7000,
        model_max_budget=MODEL_BUDGETS,
        blocked=True,
        rpm_limit=10,
        tpm_limit=20,
        models=("gpt-4o", "llama3"),
        metadata={"owner": "qa"},
    )
    assert await records.create_team(team) == team
    assert await records.get_team("team-1") == team
    assert await records.list_teams("", 10) == [team]

    changed = replace(
        team,
        soft_budget_nanos=None,
        member_budget_nanos=ODD,
        member_budget_duration="",
        member_rpm_limit=None,
        member_tpm_limit=None,
        model_max_budget={"llama3": ModelBudget(ODD + 1, "30d")},
        blocked=False,
    )
    assert await records.update_team(changed) == changed
    assert await records.get_team("team-1") == changed


async def test_a_team_without_the_new_fields_reads_back_with_defaults(
    records: RecordStore,
) -> None:
    await records.create_team(a_team())
    stored = await records.get_team("team-1")
    assert stored is not None
    assert (stored.soft_budget_nanos, stored.member_budget_nanos) == (None, None)
    assert (stored.member_rpm_limit, stored.member_tpm_limit) == (None, None)
    assert stored.member_budget_duration == "" and dict(stored.model_max_budget) == {}


async def test_new_key_fields_round_trip_exactly(records: RecordStore) -> None:
    await records.create_team(a_team())
    key = a_key(
        blocked=True,
        soft_budget_nanos=ONE_NANO,
        rpm_limit=3,
        tpm_limit=3000,
        model_max_budget=MODEL_BUDGETS,
        user_id="alice",
        max_budget_nanos=ODD,
        budget_duration="30d",
    )
    assert await records.insert_key(key) == key
    assert await records.get_key("key-1") == key
    assert await records.get_key_by_hash("hash-of-key-1") == key
    assert await records.list_keys("team-1", "", 10) == [key]


async def test_update_key_replaces_the_mutable_fields_only(records: RecordStore) -> None:
    await records.create_team(a_team())
    await records.create_team(a_team("team-2"))
    key = await records.insert_key(a_key(user_id="alice", key_alias="old"))
    await records.revoke_key("key-1", NOW + 5)
    wanted = replace(
        key,
        key_alias="new",
        max_budget_nanos=ODD,
        budget_duration="1h",
        expires_at=NOW + HOUR,
        models=("llama3",),
        blocked=True,
        soft_budget_nanos=ONE_NANO,
        rpm_limit=1,
        tpm_limit=2,
        model_max_budget={"llama3": ModelBudget(ODD, "1d")},
    )
    # What update_key must never change, sent changed anyway.
    sent = replace(
        wanted,
        key_hash="another-hash",
        team_id="team-2",
        revoked_at=None,
        key_prefix="sk-zzz",
        user_id="mallory",
        created_at=NOW + 99,
    )
    expected = replace(wanted, revoked_at=NOW + 5)
    assert await records.update_key(sent) == expected
    assert await records.get_key("key-1") == expected
    assert await records.get_key_by_hash("hash-of-key-1") == expected
    assert await records.get_key_by_hash("another-hash") is None

    unblocked = replace(expected, blocked=False, model_max_budget={})
    assert await records.update_key(unblocked) == unblocked
    assert await records.get_key("key-1") == unblocked


async def test_update_key_of_an_unknown_key_is_not_found(records: RecordStore) -> None:
    with pytest.raises(NotFound):
        await records.update_key(a_key("nope"))


# -- the JWT team upsert --------------------------------------------------------------------


async def test_create_team_if_absent_creates_once_then_returns_the_stored_team(
    records: RecordStore,
) -> None:
    first = a_team(model_max_budget=MODEL_BUDGETS)
    assert await records.create_team_if_absent(first) == (first, True)
    second = a_team(team_alias="another alias", max_budget_nanos=None)
    assert await records.create_team_if_absent(second) == (first, False)
    assert await records.get_team("team-1") == first
    assert await records.list_teams("", 10) == [first]


async def test_concurrent_create_team_if_absent_creates_exactly_one_team(
    records: RecordStore,
) -> None:
    # Postgres: the pool spreads the 16 callers over its connections (up to 10).
    candidates = [a_team("jwt-team", team_alias=f"caller {i}") for i in range(16)]
    results = await asyncio.gather(*(records.create_team_if_absent(t) for t in candidates))
    created = [team for team, new in results if new]
    assert len(created) == 1
    assert all(team == created[0] for team, _ in results)  # every caller sees the winner
    assert await records.list_teams("", 100) == created
    assert await records.get_team("jwt-team") == created[0]


async def test_concurrent_upserts_over_many_connections_create_one_team(
    store_spec: tuple[str, str],
) -> None:
    """Several replicas (one store each, each with its own pool) upsert the same team."""
    name, where = store_spec
    if name != "postgres":
        pytest.skip("on Postgres only: the embedded store serves one process")
    replicas = [PostgresRecords(where, max_size=4) for _ in range(4)]
    for replica in replicas:
        await replica.start()
    try:
        calls = [
            replicas[i % 4].create_team_if_absent(a_team("jwt", team_alias=f"replica {i % 4}"))
            for i in range(32)
        ]
        results = await asyncio.gather(*calls)
        assert sum(new for _, new in results) == 1
        assert all(team == results[0][0] for team, _ in results)
        assert len(await replicas[0].list_teams("", 100)) == 1
    finally:
        for replica in replicas:
            await replica.close()


# -- team members -----------------------------------------------------------------------------


async def test_members_upsert_get_list_delete(records: RecordStore) -> None:
    await records.create_team(a_team())
    await records.create_team(a_team("team-2"))
    alice = MemberRecord("team-1", "alice", ODD, "1d", 5, 500, created_at=NOW)
    bob = MemberRecord("team-1", "Bob", created_at=NOW + 1)  # every field: the team's default
    never = MemberRecord("team-1", "carol", ONE_NANO, "", created_at=NOW + 2)  # "" never resets
    other = MemberRecord("team-2", "alice", created_at=NOW)
    for member in (alice, bob, never, other):
        assert await records.upsert_member(member) == member

    assert await records.get_member("team-1", "alice") == alice
    assert await records.get_member("team-1", "Bob") == bob
    assert await records.get_member("team-1", "carol") == never
    assert await records.get_member("team-1", "dave") is None
    assert await records.get_member("team-3", "alice") is None
    # Ordered by user_id in code-point order ("B" < "a"), whatever the database collation.
    assert await records.list_members("team-1") == [bob, alice, never]
    assert await records.list_members("team-2") == [other]
    assert await records.list_members("team-3") == []

    # A replacement takes every field but keeps the membership's creation instant.
    changed = MemberRecord("team-1", "alice", None, None, None, 1, created_at=NOW + 50)
    assert await records.upsert_member(changed) == replace(changed, created_at=NOW)
    assert await records.get_member("team-1", "alice") == replace(changed, created_at=NOW)

    assert await records.delete_member("team-1", "alice") is True
    assert await records.delete_member("team-1", "alice") is False
    assert await records.get_member("team-1", "alice") is None
    assert await records.list_members("team-1") == [bob, never]
    assert await records.get_member("team-2", "alice") == other


async def test_a_member_of_an_unknown_team_is_not_found(records: RecordStore) -> None:
    with pytest.raises(NotFound):
        await records.upsert_member(MemberRecord("no-such-team", "alice", created_at=NOW))
    assert await records.list_members("no-such-team") == []


# -- the ledger's user and the member and model sums --------------------------------------


async def test_the_ledger_keeps_the_user_of_each_row(records: RecordStore) -> None:
    row = spend("r1", ODD, user_id="alice@example.com", model="gpt-4o")
    stored = await records.insert_spend(row)
    assert stored.inserted and stored.entry == row
    assert (await records.insert_spend(replace(row, user_id="bob"))).entry == row  # duplicate
    found = await records.get_spend("r1")
    assert found is not None and found.entry == row and not found.inserted
    jwt = spend("r2", 1, key_id="", user_id="bob")  # a JWT request: no key
    assert (await records.insert_spend(jwt)).entry == jwt
    again = await records.get_spend("r2")
    assert again is not None and again.entry == jwt


LEDGER = [  # request, team, key, user, model, cost, admitted
    ("a1", "team-1", "key-1", "alice", "gpt-4o", ONE_NANO, NOW),
    ("a2", "team-1", "key-1", "alice", "llama3", ODD, NOW + 1),
    ("a3", "team-1", "", "alice", "gpt-4o", 100, NOW + 2),  # JWT: no key
    ("b1", "team-1", "key-1", "bob", "gpt-4o", 7, NOW + 3),
    ("b2", "team-1", "key-2", "bob", "", 11, NOW + 4),
    ("n1", "team-1", "key-2", "", "gpt-4o", 13, NOW + 5),
    ("x1", "team-2", "key-3", "alice", "gpt-4o", 10**15, NOW + 6),  # another team
    ("late", "team-1", "key-1", "alice", "gpt-4o", 1000, NOW + HOUR),  # the next window
]
WINDOW = (NOW - 10, NOW + HOUR)
# (kind, scope, user, model) -> the exact sum over WINDOW
SUMS = {
    (ScopeKind.TEAM, "team-1", "", ""): ONE_NANO + ODD + 100 + 7 + 11 + 13,
    (ScopeKind.KEY, "key-1", "", ""): ONE_NANO + ODD + 7,
    (ScopeKind.KEY, "", "", ""): 100,  # the rows without a key
    (ScopeKind.MEMBER, "team-1", "alice", ""): ONE_NANO + ODD + 100,
    (ScopeKind.MEMBER, "team-1", "bob", ""): 7 + 11,
    (ScopeKind.MEMBER, "team-2", "alice", ""): 10**15,
    (ScopeKind.MEMBER, "team-1", "carol", ""): 0,
    (ScopeKind.TEAM, "team-1", "", "gpt-4o"): ONE_NANO + 100 + 7 + 13,
    (ScopeKind.TEAM, "team-1", "", "llama3"): ODD,
    (ScopeKind.TEAM, "team-1", "", "mistral"): 0,
    (ScopeKind.KEY, "key-1", "", "gpt-4o"): ONE_NANO + 7,
    (ScopeKind.KEY, "key-2", "", "gpt-4o"): 13,
    (ScopeKind.KEY, "key-1", "alice", ""): ONE_NANO + ODD,
    (ScopeKind.MEMBER, "team-1", "alice", "gpt-4o"): ONE_NANO + 100,
    (ScopeKind.MEMBER, "team-1", "bob", "llama3"): 0,
}


async def write_ledger(records: RecordStore) -> dict[str, int | None]:
    """The LEDGER rows; returns each row's transaction (None on SQLite)."""
    xacts = {}
    for request_id, team, key, user, model, cost, at in LEDGER:
        row = spend(request_id, cost, team_id=team, key_id=key, user_id=user, model=model, at=at)
        xacts[request_id] = (await records.insert_spend(row)).xact
    return xacts


async def test_sum_spend_filters_by_user_and_model_exactly(records: RecordStore) -> None:
    await write_ledger(records)
    for (kind, scope, user, model), total in SUMS.items():
        got = await records.sum_spend(kind, scope, *WINDOW, user_id=user, model=model)
        assert got == total, (kind, scope, user, model)
    # Open-ended and shifted windows.
    alice = ONE_NANO + ODD + 100 + 1000
    assert await records.sum_spend(ScopeKind.MEMBER, "team-1", NOW, None, user_id="alice") == alice
    assert (
        await records.sum_spend(ScopeKind.MEMBER, "team-1", NOW + 1, NOW + 2, user_id="alice")
        == ODD
    )
    assert await records.sum_spend(ScopeKind.KEY, "key-1", NOW + HOUR, None, model="gpt-4o") == 1000
    # Without filters the sums are what they always were.
    assert (
        await records.sum_spend(ScopeKind.TEAM, "team-1", *WINDOW)
        == SUMS[ScopeKind.TEAM, "team-1", "", ""]
    )


async def test_sum_spend_as_of_filters_the_same_and_keeps_its_snapshot(
    records: RecordStore, store_spec: tuple[str, str]
) -> None:
    xacts = await write_ledger(records)
    for (kind, scope, user, model), total in SUMS.items():
        found = await records.sum_spend_as_of(kind, scope, *WINDOW, user_id=user, model=model)
        assert found.total == total, (kind, scope, user, model)
        if store_spec[0] == "sqlite":
            assert found.snapshot is None
        else:  # every row already written is visible in the snapshot of the sum
            assert all(visible(xact, found.snapshot) for xact in xacts.values())
    if store_spec[0] != "sqlite":
        later = await records.insert_spend(spend("new", 5, user_id="alice"))
        assert later.xact is not None and not visible(later.xact, found.snapshot)
        after = await records.sum_spend_as_of(ScopeKind.MEMBER, "team-1", *WINDOW, user_id="alice")
        assert after.total == SUMS[ScopeKind.MEMBER, "team-1", "alice", ""] + 5
        assert visible(later.xact, after.snapshot)


async def test_spend_reports_keep_rows_without_a_key(records: RecordStore) -> None:
    await records.create_team(a_team())
    await records.insert_key(a_key(key_alias="main"))
    await records.insert_spend(spend("k", 5))
    await records.insert_spend(spend("j1", 7, key_id="", user_id="alice"))
    await records.insert_spend(spend("j2", 1, key_id="", user_id="bob"))
    query = SpendQuery(NOW - 1, NOW + 1, group_by=(SpendGroup.TEAM, SpendGroup.KEY))
    rows = await records.spend_report(query)
    assert [(r.team_id, r.team_alias, r.key_id, r.key_alias, r.spend_nanos) for r in rows] == [
        ("team-1", "QA Prod Bot", "", "", 8),
        ("team-1", "QA Prod Bot", "key-1", "main", 5),
    ]
    [total] = await records.spend_report(SpendQuery(NOW - 1, NOW + 1, team_id="team-1"))
    assert (total.spend_nanos, total.requests) == (13, 3)


def test_a_spooled_row_keeps_its_user() -> None:
    row = spend("s1", ODD, key_id="", user_id="alice@example.com", model="gpt-4o")
    assert decode(encode(row)) == row
    # A line spooled before users existed still decodes, with no user.
    old = json.loads(encode(row))
    del old["user_id"]
    assert decode(json.dumps(old)) == replace(row, user_id="")


# -- the record cache: members like keys and teams --------------------------------------------


class Counting(SqliteRecords):
    """Counts the reads and writes that reach the store."""

    member_reads = 0
    team_reads = 0
    upserts = 0

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        self.member_reads += 1
        return await super().get_member(team_id, user_id)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        self.team_reads += 1
        return await super().get_team(team_id)

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        self.upserts += 1
        return await super().create_team_if_absent(team)


@pytest.fixture
async def cached(tmp_path: Path) -> AsyncIterator[tuple[CachedRecords, Counting, list[float]]]:
    inner = Counting(tmp_path / "records.sqlite3")
    clock = [0.0]
    store = CachedRecords(inner, ttl=5.0, serve_stale=False, clock=lambda: clock[0])
    await store.start()
    try:
        yield store, inner, clock
    finally:
        await store.close()


async def test_the_cache_keeps_members_for_the_ttl_and_refreshes_on_local_writes(
    cached: tuple[CachedRecords, Counting, list[float]],
) -> None:
    store, inner, clock = cached
    await store.create_team(a_team())
    assert await store.get_member("team-1", "alice") is None  # absence is cached too
    assert await store.get_member("team-1", "alice") is None
    assert inner.member_reads == 1

    alice = MemberRecord("team-1", "alice", ODD, created_at=NOW)
    assert await store.upsert_member(alice) == alice  # a local write: seen at once
    assert await store.get_member("team-1", "alice") == alice
    assert inner.member_reads == 1

    # Another replica's change is seen once the entry is older than the ttl.
    await inner.upsert_member(replace(alice, max_budget_nanos=ONE_NANO))
    assert await store.get_member("team-1", "alice") == alice
    clock[0] = 5.0
    assert await store.get_member("team-1", "alice") == replace(alice, max_budget_nanos=ONE_NANO)
    assert inner.member_reads == 2

    assert await store.delete_member("team-1", "alice") is True
    assert await store.get_member("team-1", "alice") is None
    assert inner.member_reads == 2
    assert await store.list_members("team-1") == []


async def test_the_cache_refreshes_a_key_on_update_key(
    cached: tuple[CachedRecords, Counting, list[float]],
) -> None:
    store, _, _ = cached
    await store.create_team(a_team())
    key = await store.insert_key(a_key())
    assert await store.get_key_by_hash(key.key_hash) == key
    blocked = await store.update_key(replace(key, blocked=True))
    assert blocked.blocked
    assert await store.get_key_by_hash(key.key_hash) == blocked
    assert await store.get_key(key.key_id) == blocked


async def test_the_cache_answers_the_team_upsert_from_a_fresh_team(
    cached: tuple[CachedRecords, Counting, list[float]],
) -> None:
    store, inner, clock = cached
    team = a_team("jwt")
    assert await store.create_team_if_absent(team) == (team, True)
    assert await store.get_team("jwt") == team  # populated by the upsert
    assert inner.team_reads == 0
    assert await store.create_team_if_absent(replace(team, team_alias="x")) == (team, False)
    assert inner.upserts == 1  # answered from the cache: no write
    clock[0] = 5.0
    assert await store.create_team_if_absent(replace(team, team_alias="x")) == (team, False)
    assert inner.upserts == 2


# -- migration 0004 on a database with data ----------------------------------------------


async def test_postgres_migration_0004_keeps_existing_rows(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        early = [m for m in load_migrations() if m[0] <= 3]
        assert [v for v, _ in early] == [1, 2, 3]
        await apply_migrations(conn, early)
        await conn.execute(
            "INSERT INTO teams (team_id, team_alias, max_budget, budget_duration, tpm_limit,"
            " rpm_limit, models, metadata, blocked, created_at)"
            " VALUES ('team-1', 'QA', 0.000000001, '1d', 5, 6, '{gpt-4o}', '{\"a\": 1}', true,"
            " to_timestamp($1))",
            NOW,
        )
        await conn.execute(
            "INSERT INTO api_keys (key_id, key_hash, key_prefix, team_id, key_alias, max_budget,"
            " budget_duration, models, user_id, created_at)"
            " VALUES ('key-1', 'h1', 'sk-1', 'team-1', 'main', 123456.000000001, '1h', '{}',"
            " 'alice', to_timestamp($1))",
            NOW,
        )
        await conn.execute(
            "INSERT INTO spend_ledger (request_id, team_id, key_id, cost, admitted_at,"
            " recorded_at, model) VALUES ('r1', 'team-1', 'key-1', 0.000000003,"
            " to_timestamp($1), to_timestamp($1), 'gpt-4o')",
            NOW,
        )
    finally:
        await conn.close()

    records = PostgresRecords(database_url)
    await records.start()
    try:
        await check_migrated(records)
    finally:
        await records.close()


async def test_sqlite_migration_0004_keeps_existing_rows(tmp_path: Path) -> None:
    path = tmp_path / "records.sqlite3"
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "CREATE TABLE budgetd_schema_migrations (version INTEGER PRIMARY KEY,"
            " applied_at REAL NOT NULL DEFAULT (strftime('%s', 'now')))"
        )
        early = [m for m in migration_files() if m[0] <= 3]
        assert [v for v, _ in early] == [1, 3]
        for version, sql in early:
            conn.executescript(
                f"BEGIN;\n{sql}\nINSERT INTO budgetd_schema_migrations (version)"
                f" VALUES ({version});\nCOMMIT;"
            )
        with conn:
            conn.execute(
                "INSERT INTO teams (team_id, team_alias, max_budget_nanos, budget_duration,"
                " tpm_limit, rpm_limit, models, metadata, blocked, created_at)"
                " VALUES ('team-1', 'QA', 1, '1d', 5, 6, '[\"gpt-4o\"]', '{\"a\": 1}', 1, ?)",
                (NOW,),
            )
            conn.execute(
                "INSERT INTO api_keys (key_id, key_hash, key_prefix, team_id, key_alias,"
                " max_budget_nanos, budget_duration, user_id, created_at)"
                " VALUES ('key-1', 'h1', 'sk-1', 'team-1', 'main', ?, '1h', 'alice', ?)",
                (ODD, NOW),
            )
            conn.execute(
                "INSERT INTO spend_ledger (request_id, team_id, key_id, cost_nanos, admitted_at,"
                " recorded_at, model) VALUES ('r1', 'team-1', 'key-1', 3, ?, ?, 'gpt-4o')",
                (NOW, NOW),
            )
    finally:
        conn.close()

    records = SqliteRecords(path)
    await records.start()
    try:
        assert records.applied_migrations == (4,)
        await check_migrated(records)
    finally:
        await records.close()


async def check_migrated(records: RecordStore) -> None:
    """The rows written under schema 3, read under schema 4: kept, with the defaults."""
    team = await records.get_team("team-1")
    assert team == TeamRecord(
        team_id="team-1",
        team_alias="QA",
        max_budget_nanos=ONE_NANO,
        budget_duration="1d",
        tpm_limit=5,
        rpm_limit=6,
        models=("gpt-4o",),
        metadata={"a": 1},
        blocked=True,
        created_at=NOW,
    )
    key = await records.get_key("key-1")
    assert key == KeyRecord(
        key_id="key-1",
        key_hash="h1",
        team_id="team-1",
        key_alias="main",
        max_budget_nanos=ODD,
        budget_duration="1h",
        key_prefix="sk-1",
        user_id="alice",
        created_at=NOW,
    )
    stored = await records.get_spend("r1")
    assert stored is not None
    assert (stored.entry.cost_nanos, stored.entry.user_id, stored.entry.model) == (3, "", "gpt-4o")
    assert await records.sum_spend(ScopeKind.TEAM, "team-1", 0, None) == 3
    assert await records.sum_spend(ScopeKind.KEY, "key-1", 0, None, model="gpt-4o") == 3
    assert await records.sum_spend(ScopeKind.MEMBER, "team-1", 0, None, user_id="alice") == 0

    # The new schema works on the migrated rows.
    assert await records.list_members("team-1") == []
    alice = MemberRecord("team-1", "alice", ONE_NANO, created_at=NOW)
    assert await records.upsert_member(alice) == alice
    updated = await records.update_key(
        replace(key, blocked=True, model_max_budget={"gpt-4o": ModelBudget(ODD, "1d")})
    )
    assert updated.blocked and updated.model_max_budget == {"gpt-4o": ModelBudget(ODD, "1d")}
