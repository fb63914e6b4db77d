"""Group commit of the Postgres ledger (issue 7): concurrent insert_spend calls share one
statement and one commit, and each caller still gets exactly the answer it got alone.

Against a real Postgres. Statements are counted with the store's batcher counters, never
with timing; where a test needs a flush held in flight, another connection holds a lock on
the ledger and the test waits until Postgres shows the insert waiting for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from server.errors import InvalidArgument, RecordsUnavailable
from server.storage.base import LedgerEntry, LedgerInsert
from server.storage.postgres import PostgresRecords

NOW = 1_718_318_916.0


def spend(request_id: str, cost: int = 1_000, **changes: Any) -> LedgerEntry:
    entry = LedgerEntry(
        request_id=request_id,
        team_id="team-1",
        key_id="key-1",
        cost_nanos=cost,
        admitted_at=NOW,
        recorded_at=NOW + 1,
        reservation_id="res-1",
        model="gpt-4o",
        prompt_tokens=3,
        completion_tokens=4,
        metadata={"trace": request_id},
        user_id="alice",
    )
    return replace(entry, **changes)


@pytest.fixture
async def records(database_url: str) -> AsyncIterator[PostgresRecords]:
    store = PostgresRecords(database_url)
    await store.start()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection of the test's own, to look at the ledger (and to hold locks on it)."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def ledger(conn: asyncpg.Connection[asyncpg.Record]) -> dict[str, tuple[int, int]]:
    """request_id -> (how many rows, xact) of every ledger row."""
    rows = await conn.fetch(
        "SELECT request_id, count(*) OVER (PARTITION BY request_id) AS n, xact FROM spend_ledger"
    )
    return {row["request_id"]: (row["n"], row["xact"]) for row in rows}


async def wait_until_an_insert_waits_for_a_lock(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Until a ledger INSERT of another backend waits for our lock: a flush is in flight."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE 'INSERT INTO spend_ledger%' AND pid <> pg_backend_pid()"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no ledger insert ever waited for the lock")


async def test_an_idle_insert_is_flushed_alone_and_at_once(records: PostgresRecords) -> None:
    stored = await records.insert_spend(spend("r1"))
    assert stored.inserted and stored.entry == spend("r1") and stored.xact is not None
    batcher = records.ledger_batcher
    assert (batcher.flushes, batcher.largest_batch) == (1, 1)


async def test_concurrent_inserts_share_statements_and_each_row_is_written_once(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    entries = [spend(f"r{i:02}", cost=1_000 + i) for i in range(50)]
    results = await asyncio.gather(*(records.insert_spend(entry) for entry in entries))

    batcher = records.ledger_batcher
    assert batcher.flushes < 50 and batcher.largest_batch > 1
    assert batcher.flushed_items == 50
    assert [r.inserted for r in results] == [True] * 50
    assert [r.entry for r in results] == entries  # each caller gets its own row back
    stored = await ledger(conn)
    assert sorted(stored) == [entry.request_id for entry in entries]
    assert all(count == 1 for count, _ in stored.values())
    total = await conn.fetchval("SELECT sum(cost) FROM spend_ledger")
    assert total * 10**9 == sum(entry.cost_nanos for entry in entries)  # exact


async def test_the_xact_returned_is_the_rows_xact_and_one_per_commit(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    results = await asyncio.gather(*(records.insert_spend(spend(f"x{i}")) for i in range(10)))
    assert records.ledger_batcher.flushes == 1
    stored = await ledger(conn)
    assert all(r.xact == stored[r.entry.request_id][1] for r in results)
    assert len({r.xact for r in results}) == 1  # the rows committed together
    later = await records.insert_spend(spend("y"))
    again = await records.insert_spend(spend("x3"))  # a duplicate: the stored row's xact
    assert later.xact != results[0].xact and later.xact == (await ledger(conn))["y"][1]
    assert not again.inserted and again.xact == results[0].xact


async def test_concurrent_duplicates_insert_once_and_all_get_the_stored_row(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    # The same request_id 20 times, with different costs: the first in line wins.
    calls = [spend("dup", cost=100 + i) for i in range(20)] + [spend("other")]
    results = await asyncio.gather(*(records.insert_spend(entry) for entry in calls))

    assert records.ledger_batcher.flushes == 1  # all in one statement
    assert [r.inserted for r in results] == [True] + [False] * 19 + [True]
    assert all(r.entry == calls[0] and r.xact == results[0].xact for r in results[:20])
    stored = await ledger(conn)
    assert stored == {"dup": (1, results[0].xact), "other": (1, results[20].xact)}


async def test_rows_already_in_the_ledger_are_answered_as_duplicates_in_a_batch(
    records: PostgresRecords,
) -> None:
    before = await records.insert_spend(spend("old", cost=5))
    calls = [spend("new-1"), spend("old", cost=999), spend("new-2"), spend("old", cost=1)]
    results = await asyncio.gather(*(records.insert_spend(entry) for entry in calls))
    assert records.ledger_batcher.largest_batch == 4
    assert [r.inserted for r in results] == [True, False, True, False]
    assert results[1] == results[3] == LedgerInsert(False, spend("old", cost=5), before.xact)


async def test_a_negative_cost_in_a_batch_fails_only_its_own_call(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    calls = [spend(f"ok{i}") for i in range(9)]
    calls.insert(4, spend("bad", cost=-5))
    results = await asyncio.gather(
        *(records.insert_spend(entry) for entry in calls), return_exceptions=True
    )
    assert records.ledger_batcher.flushes == 1  # one batch, retried row by row inside
    bad = results.pop(4)
    assert isinstance(bad, InvalidArgument) and str(bad) == "cost must not be negative, got -5"
    assert all(isinstance(r, LedgerInsert) and r.inserted for r in results)
    assert sorted(await ledger(conn)) == [f"ok{i}" for i in range(9)]


async def test_a_duplicate_after_a_failing_row_of_the_same_id_is_inserted(
    records: PostgresRecords,
) -> None:
    """As if the calls had come one after another: the bad one writes nothing."""
    results = await asyncio.gather(
        records.insert_spend(spend("r", cost=-1)),
        records.insert_spend(spend("r", cost=7)),
        records.insert_spend(spend("r", cost=8)),
        return_exceptions=True,
    )
    failed, first, second = results
    assert isinstance(failed, InvalidArgument)
    assert isinstance(first, LedgerInsert) and first.inserted
    assert first.entry == spend("r", cost=7)
    assert second == LedgerInsert(False, spend("r", cost=7), first.xact)


async def test_a_connection_failure_reaches_every_caller_of_the_batch_as_unavailable(
    database_url: str, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    store = PostgresRecords(database_url, command_timeout=0.5)
    await store.start()
    try:
        async with conn.transaction():  # the ledger locked for longer than the timeout
            await conn.execute("LOCK TABLE spend_ledger IN SHARE MODE")
            results = await asyncio.gather(
                *(store.insert_spend(spend(f"t{i}")) for i in range(10)), return_exceptions=True
            )
        assert store.ledger_batcher.flushes == 1
        assert all(isinstance(r, RecordsUnavailable) for r in results), results
        assert all(str(r) == "postgres unavailable: TimeoutError" for r in results)
        # The retries of the same requests (RecordSpend's, or the spool's) are written once.
        retried = await asyncio.gather(*(store.insert_spend(spend(f"t{i}")) for i in range(10)))
        assert all(r.entry == spend(f"t{i}") for i, r in enumerate(retried))
        assert all(count == 1 for count, _ in (await ledger(conn)).values())
        assert len(await ledger(conn)) == 10
    finally:
        await store.close()


async def test_a_cancelled_caller_does_not_break_the_flush_of_the_others(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with conn.transaction():  # hold the flush in flight until the cancel is done
        await conn.execute("LOCK TABLE spend_ledger IN SHARE MODE")
        calls = [asyncio.create_task(records.insert_spend(spend(f"c{i}"))) for i in range(5)]
        await wait_until_an_insert_waits_for_a_lock(conn)
        calls[2].cancel()
        await asyncio.sleep(0)
    results = [await calls[i] for i in (0, 1, 3, 4)]
    assert calls[2].cancelled()
    assert all(r.inserted for r in results)
    # The cancelled call's row went with its batch (as when a client goes away mid-insert);
    # its retry is answered as a duplicate.
    assert sorted(await ledger(conn)) == [f"c{i}" for i in range(5)]
    retry = await records.insert_spend(spend("c2"))
    assert not retry.inserted and retry.xact == results[0].xact


async def test_close_lets_queued_inserts_commit_first(
    database_url: str, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    store = PostgresRecords(database_url, max_size=1)  # one flush at a time: the rest queue
    await store.start()
    async with conn.transaction():
        await conn.execute("LOCK TABLE spend_ledger IN SHARE MODE")
        first = asyncio.create_task(store.insert_spend(spend("q0")))
        await wait_until_an_insert_waits_for_a_lock(conn)
        queued = [asyncio.create_task(store.insert_spend(spend(f"q{i}"))) for i in range(1, 6)]
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.05)
        assert not closing.done()
    await closing
    results = [await first] + [await call for call in queued]
    assert all(r.inserted for r in results)
    assert store.ledger_batcher.flushes == 2
    assert sorted(await ledger(conn)) == [f"q{i}" for i in range(6)]
    with pytest.raises(RecordsUnavailable):  # closed: later calls fail cleanly
        await store.insert_spend(spend("late"))


async def test_a_saturated_pool_is_unavailable_after_the_timeout_and_then_recovers(
    database_url: str,
) -> None:
    store = PostgresRecords(database_url, max_size=1, command_timeout=0.3)
    await store.start()
    try:
        async with store._connection():  # the pool's only connection, held
            started = asyncio.get_running_loop().time()
            with pytest.raises(RecordsUnavailable, match="postgres unavailable: TimeoutError"):
                await store.get_team("team-1")
            waited = asyncio.get_running_loop().time() - started
            assert 0.25 <= waited < 5.0
        # The abandoned wait left the pool whole: its connection serves the next call.
        assert await store.get_team("team-1") is None
        assert (await store.insert_spend(spend("after"))).inserted
    finally:
        await store.close()


async def backend_pids(conn: asyncpg.Connection[asyncpg.Record]) -> set[int]:
    """The Postgres backends that have run a ledger insert (other than this connection)."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'INSERT INTO spend_ledger%'"
        " AND pid <> pg_backend_pid()"
    )
    return {row["pid"] for row in rows}


async def test_flushes_keep_their_connection_and_leave_the_pool_one_for_the_rest(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    for i in range(5):  # one flush after another: the same kept connection each time
        assert (await records.insert_spend(spend(f"k{i}"))).inserted
    assert len(await backend_pids(conn)) == 1
    assert len(records._kept) == 1
    # Two flushes in flight keep two; never more than the batcher runs at once.
    await asyncio.gather(*(records.insert_spend(spend(f"m{i}")) for i in range(40)))
    assert 1 <= len(records._kept) <= 2
    assert await records.get_team("team-1") is None  # the pool still serves the rest


def closed(proxy: Any) -> bool:
    """True once asyncpg knows a pooled connection is closed (it detaches the proxy then)."""
    try:
        return bool(proxy.is_closed())
    except asyncpg.InterfaceError:
        return True


async def test_a_kept_connection_that_postgres_ended_is_replaced(
    records: PostgresRecords, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    assert (await records.insert_spend(spend("before"))).inserted
    (pid,) = await backend_pids(conn)
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    for _ in range(100):  # until asyncpg has seen its socket close
        if closed(records._kept[0]):
            break
        await asyncio.sleep(0.02)
    assert (await records.insert_spend(spend("after"))).inserted
    assert sorted(await ledger(conn)) == ["after", "before"]
    assert (await backend_pids(conn)) - {pid}


async def test_a_failed_flush_returns_its_connection_and_close_returns_the_kept_ones(
    database_url: str, conn: asyncpg.Connection[asyncpg.Record]
) -> None:
    store = PostgresRecords(database_url, command_timeout=0.5)
    await store.start()
    try:
        async with conn.transaction():  # the flush times out
            await conn.execute("LOCK TABLE spend_ledger IN SHARE MODE")
            with pytest.raises(RecordsUnavailable):
                await store.insert_spend(spend("f0"))
        assert store._kept == []  # back to the pool, which resets or replaces it
        assert (await store.insert_spend(spend("f1"))).inserted
        assert len(store._kept) == 1
    finally:
        # A kept connection is the pool's again: close() does not wait out its timeout.
        async with asyncio.timeout(5):
            await store.close()
    assert store._kept == []


async def test_a_pool_of_two_keeps_no_connection(database_url: str) -> None:
    store = PostgresRecords(database_url, max_size=2)
    await store.start()
    try:
        await asyncio.gather(*(store.insert_spend(spend(f"s{i}")) for i in range(10)))
        assert store._kept == []
    finally:
        await store.close()
