"""The record store down, in process: the record cache, and RecordSpend spooling to disk.

``FlakyRecords`` is the embedded SQLite store with a switch that makes every call fail as an
unreachable Postgres does (RecordsUnavailable). The fault tests in tests/faults/ do the same
with real processes and a real Postgres; these pin down each rule on its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from harness import make_settings
from server.admin import Admin, NewKey, NewTeam
from server.app import make_stores
from server.authority import Authority, CheckRequest, SpendRequest
from server.clock import FakeClock
from server.errors import RecordsUnavailable
from server.identity import ReservationCodec, hash_api_key
from server.metrics import Metrics
from server.rules import Enforcement
from server.scopes import Principal, request_scopes
from server.spool import CONFLICTS_FILE, Spool
from server.storage.base import KeyRecord, LedgerEntry, LedgerInsert, TeamRecord
from server.storage.cached_records import CachedRecords
from server.storage.failover_counters import FailoverCounters
from server.storage.leasing import LeasingCounters
from server.storage.memory_counters import MemoryCounters
from server.storage.redis_counters import RedisCounters
from server.storage.sqlite import SqliteRecords

NOW = 1_718_318_916.0  # 2024-06-13T22:48:36Z
TTL = 5.0


class FlakyRecords(SqliteRecords):
    """SQLite records that fail like an unreachable Postgres while ``down``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = False
        self.reads = 0
        self.gate: asyncio.Event | None = None  # when set, key reads wait for it

    def _check(self) -> None:
        if self.down:
            raise RecordsUnavailable("postgres unavailable: (test) switched off")

    async def get_team(self, team_id: str) -> TeamRecord | None:
        self._check()
        self.reads += 1
        return await super().get_team(team_id)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        self._check()
        self.reads += 1
        return await super().get_key(key_id)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        self._check()
        self.reads += 1
        found = await super().get_key_by_hash(key_hash)
        if self.gate is not None:
            await self.gate.wait()
        return found

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        self._check()
        return await super().insert_spend(entry)

    async def sum_spend(self, *args: Any, **filters: Any) -> int:
        self._check()
        return await super().sum_spend(*args, **filters)

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        self._check()
        return await super().create_team(team)


@dataclass
class Rig:
    inner: FlakyRecords
    records: CachedRecords
    counters: MemoryCounters
    clock: FakeClock
    spool: Spool
    authority: Authority
    admin: Admin
    monotonic: list[float]


async def make_rig(tmp_path: Path, *, spool: bool = True) -> Rig:
    inner = FlakyRecords(tmp_path / "records.sqlite3")
    await inner.start()
    monotonic = [0.0]
    records = CachedRecords(inner, ttl=TTL, serve_stale=spool, clock=lambda: monotonic[0])
    counters = MemoryCounters()
    clock = FakeClock(NOW)
    disk = Spool(tmp_path / "spool")
    await disk.open()
    authority = Authority(
        records, counters, clock, ReservationCodec(b"x" * 32),
        enforcement=Enforcement.CROSS_ONCE, reservation_ttl=60.0, tz=UTC,
        prices={}, spool=disk if spool else None,
    )  # fmt: skip
    admin = Admin(records, counters, clock, tz=UTC)
    return Rig(inner, records, counters, clock, disk, authority, admin, monotonic)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    made = await make_rig(tmp_path)
    try:
        yield made
    finally:
        await made.inner.close()


async def team_and_key(rig: Rig, duration: str = "") -> tuple[str, str]:
    team = await rig.admin.create_team(
        NewTeam(team_alias="t", max_budget=100.0, budget_duration=duration)
    )
    issued = await rig.admin.issue_key(NewKey(team_id=team.team.team_id))
    return team.team.team_id, issued.plaintext


# -- the record cache ---------------------------------------------------------------------------


async def test_cached_keys_are_fresh_for_the_ttl_then_read_again(rig: Rig) -> None:
    _, key = await team_and_key(rig)
    found = await rig.records.get_key_by_hash(hash_api_key(key))
    assert found is not None
    reads = rig.inner.reads
    await rig.records.get_key_by_hash(hash_api_key(key))
    await rig.records.get_key(found.key_id)  # filled by the read by hash
    assert rig.inner.reads == reads
    rig.monotonic[0] += TTL
    await rig.records.get_key_by_hash(hash_api_key(key))
    assert rig.inner.reads == reads + 1


async def test_stale_entries_answer_only_while_the_store_is_down(rig: Rig) -> None:
    _, key = await team_and_key(rig)
    assert await rig.records.get_key_by_hash(hash_api_key(key)) is not None
    rig.monotonic[0] += 3600
    rig.inner.down = True
    assert await rig.records.get_key_by_hash(hash_api_key(key)) is not None  # stale, any age
    with pytest.raises(RecordsUnavailable):  # never seen: no guess
        await rig.records.get_key_by_hash(hash_api_key("sk-never-seen"))


async def test_without_serve_stale_an_expired_entry_is_not_used(tmp_path: Path) -> None:
    strict = await make_rig(tmp_path, spool=False)
    try:
        _, key = await team_and_key(strict)
        await strict.records.get_key_by_hash(hash_api_key(key))
        strict.inner.down = True
        assert await strict.records.get_key_by_hash(hash_api_key(key)) is not None  # fresh
        strict.monotonic[0] += TTL
        with pytest.raises(RecordsUnavailable):
            await strict.records.get_key_by_hash(hash_api_key(key))
    finally:
        await strict.inner.close()


async def test_writes_through_this_process_apply_at_once(rig: Rig) -> None:
    _, key = await team_and_key(rig)
    assert (await rig.authority.check(CheckRequest(api_key=key))).allowed
    await rig.admin.revoke_key(key=key)
    assert (await rig.authority.check(CheckRequest(api_key=key))).message == (
        "API key has been revoked."
    )


async def test_a_read_that_began_before_a_write_does_not_undo_it(rig: Rig) -> None:
    _, key = await team_and_key(rig)
    key_id = (await rig.admin.get_key(key=key)).key.key_id
    rig.monotonic[0] += TTL  # nothing fresh: the next read goes to the store
    rig.inner.gate = asyncio.Event()
    slow_read = asyncio.ensure_future(rig.records.get_key_by_hash(hash_api_key(key)))
    await asyncio.sleep(0.05)  # it has read the key, not yet revoked, and waits
    await rig.records.revoke_key(key_id, NOW)  # a write while the slow read is out
    rig.inner.gate.set()
    before = await slow_read
    assert before is not None and before.revoked_at is None
    cached = await rig.records.get_key_by_hash(hash_api_key(key))
    assert cached is not None and cached.revoked_at == NOW


async def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    inner = FlakyRecords(tmp_path / "r.sqlite3")
    await inner.start()
    try:
        records = CachedRecords(inner, ttl=60, serve_stale=True, capacity=2)
        for name in ("a", "b", "c"):
            await records.create_team(TeamRecord(name, name, None, ""))
        inner.down = True
        assert await records.get_team("c") is not None
        assert await records.get_team("b") is not None
        with pytest.raises(RecordsUnavailable):
            await records.get_team("a")  # evicted
    finally:
        await inner.close()


# -- RecordSpend while the record store is down ---------------------------------------------


async def test_record_spend_is_spooled_settled_and_replayed_exactly_once(rig: Rig) -> None:
    team_id, key = await team_and_key(rig)
    first = await rig.authority.check(CheckRequest(api_key=key, estimated_cost=0.5))
    rig.inner.down = True

    decision = await rig.authority.check(CheckRequest(api_key=key, estimated_cost=0.5))
    result = await rig.authority.record(
        SpendRequest(request_id="q1", reservation_id=decision.reservation_id, cost=0.25)
    )
    retry = await rig.authority.record(
        SpendRequest(request_id="q1", reservation_id=decision.reservation_id, cost=0.25)
    )

    assert decision.allowed and first.allowed
    assert (result.duplicate, result.team_spend_nanos) == (False, 250_000_000)
    assert (retry.duplicate, retry.team_spend_nanos) == (True, 250_000_000)
    assert rig.spool.depth == 2
    lines = (rig.spool.directory / "spool.jsonl").read_text().splitlines()
    assert [json.loads(line)["cost_nanos"] for line in lines] == [250_000_000] * 2

    rig.inner.down = False
    assert await rig.spool.replay(rig.records, rig.authority.settler.settle_row) == (2, 0)
    assert rig.spool.depth == 0 and not list(rig.spool.directory.glob("*.jsonl"))
    assert await rig.inner.ledger_entries(team_id) == [
        LedgerEntry("q1", team_id, decision.key_id, 250_000_000, NOW, NOW, decision.reservation_id)
    ]
    team = await rig.admin.get_team(team_id)
    assert team.spend_nanos == 250_000_000  # replay did not settle it a second time


async def test_a_crash_between_the_spool_and_the_counters_is_settled_at_replay(
    rig: Rig,
) -> None:
    team_id, key = await team_and_key(rig)
    decision = await rig.authority.check(CheckRequest(api_key=key))
    # What a RecordSpend that died right after its fsync leaves: a spooled row, no settle.
    await rig.spool.append(
        LedgerEntry("q1", team_id, decision.key_id, 7, NOW, NOW, decision.reservation_id)
    )
    assert await rig.spool.replay(rig.records, rig.authority.settler.settle_row) == (1, 0)
    assert (await rig.admin.get_team(team_id)).spend_nanos == 7


async def test_a_key_never_seen_cannot_spend_or_be_checked_while_down(rig: Rig) -> None:
    # Issued through another replica: this one has never seen the key or its team.
    elsewhere = Admin(rig.inner, rig.counters, rig.clock, tz=UTC)
    team = await elsewhere.create_team(NewTeam(team_alias="t"))
    key = (await elsewhere.issue_key(NewKey(team_id=team.team.team_id))).plaintext
    rig.inner.down = True
    with pytest.raises(RecordsUnavailable):
        await rig.authority.check(CheckRequest(api_key=key))
    with pytest.raises(RecordsUnavailable):
        await rig.authority.record(SpendRequest(request_id="q", api_key=key, cost=1.0))
    with pytest.raises(RecordsUnavailable):  # admin writes need the store
        await rig.admin.create_team(NewTeam(team_alias="later"))
    assert rig.spool.depth == 0


async def test_a_window_that_begins_during_the_outage_starts_from_zero(rig: Rig) -> None:
    team_id, key = await team_and_key(rig, duration="1m")
    await rig.authority.record(SpendRequest(request_id="before", api_key=key, cost=1.0))
    rig.inner.down = True
    rig.clock.advance(60)  # a new minute: its counters must be created without the ledger

    decision = await rig.authority.check(CheckRequest(api_key=key))
    result = await rig.authority.record(
        SpendRequest(request_id="during", reservation_id=decision.reservation_id, cost=2.0)
    )

    assert decision.allowed and decision.spend_nanos == 0
    assert result.team_spend_nanos == 2_000_000_000
    rig.inner.down = False
    await rig.spool.replay(rig.records, rig.authority.settler.settle_row)
    key_record = await rig.records.get_key(decision.key_id)
    team_record = await rig.records.get_team(team_id)
    assert key_record is not None and team_record is not None
    scopes = request_scopes(Principal(team_record, key_record), rig.clock.now(), UTC)
    ledger = await rig.inner.sum_spend(
        scopes[1].kind, team_id, scopes[1].window.start, scopes[1].window.end
    )
    assert ledger == 2_000_000_000 == (await rig.admin.get_team(team_id)).spend_nanos


async def test_with_postgres_down_deny_record_spend_is_refused_and_nothing_spooled(
    tmp_path: Path,
) -> None:
    strict = await make_rig(tmp_path, spool=False)
    try:
        _, key = await team_and_key(strict)
        decision = await strict.authority.check(CheckRequest(api_key=key))
        strict.inner.down = True
        with pytest.raises(RecordsUnavailable):
            await strict.authority.record(
                SpendRequest(request_id="q", reservation_id=decision.reservation_id, cost=1.0)
            )
        assert strict.spool.depth == 0
    finally:
        await strict.inner.close()


async def test_a_conflicting_spooled_row_is_kept_aside_and_the_ledger_wins(rig: Rig) -> None:
    team_id, key = await team_and_key(rig)
    await rig.authority.record(SpendRequest(request_id="q1", api_key=key, cost=1.0))
    [stored] = await rig.inner.ledger_entries(team_id)
    await rig.spool.append(replace(stored, cost_nanos=5))

    assert await rig.spool.replay(rig.records) == (0, 1)
    conflicts = (rig.spool.directory / CONFLICTS_FILE).read_text().splitlines()
    assert [json.loads(line)["cost_nanos"] for line in conflicts] == [5]
    assert [e.cost_nanos for e in await rig.inner.ledger_entries(team_id)] == [1_000_000_000]


async def test_the_spool_depth_is_a_metric(rig: Rig) -> None:
    metrics = Metrics()
    metrics.watch_failures(spool_depth=lambda: rig.spool.depth, on_postgres=lambda: True)
    await rig.spool.append(LedgerEntry("q", "t", "k", 1, NOW, NOW))
    text = metrics.exposition().decode()
    assert "budgetd_spool_depth 1.0" in text
    assert "budgetd_counters_on_postgres 1.0" in text


def test_the_failure_policies_choose_the_stores(tmp_path: Path) -> None:
    both = {"database_url": "postgresql://db/x", "redis_url": "redis://r:6379/0"}
    riding_out = make_stores(make_settings(tmp_path, **both))
    assert isinstance(riding_out.records, CachedRecords)
    assert isinstance(riding_out.counters, LeasingCounters)
    assert isinstance(riding_out.counters.inner, FailoverCounters)
    assert riding_out.spool is not None
    assert riding_out.spool.directory == tmp_path / "data" / "spool"

    strict = make_stores(make_settings(tmp_path, **both, redis_down="deny", postgres_down="deny"))
    assert isinstance(strict.counters, LeasingCounters)
    assert isinstance(strict.counters.inner, RedisCounters)
    assert strict.spool is None
    assert isinstance(strict.records, CachedRecords)  # cached, but never served stale

    embedded = make_stores(make_settings(tmp_path))
    assert embedded.spool is None and isinstance(embedded.records, CachedRecords)
    assert isinstance(embedded.records.inner, SqliteRecords)
