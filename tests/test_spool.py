"""The spend spool on its own: durable appends, and replays that are safe to repeat."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from server.errors import RecordsUnavailable, Unavailable
from server.spool import SPOOL_FILE, Spool, decode, encode
from server.storage.base import LedgerEntry, LedgerInsert
from server.storage.sqlite import SqliteRecords

NOW = 1_718_318_916.123456


def entry(request_id: str, cost: int = 1) -> LedgerEntry:
    return LedgerEntry(
        request_id, "team", "key", cost, NOW, NOW + 0.5, "r1", "llama3", 3, 4, {"a": [1, "b"]}
    )


class Flaky(SqliteRecords):
    """Fails every insert after ``fail_after`` of them."""

    fail_after: int | None = None
    inserts = 0

    async def insert_spend(self, e: LedgerEntry) -> LedgerInsert:
        if self.fail_after is not None and self.inserts >= self.fail_after:
            raise RecordsUnavailable("postgres unavailable: (test)")
        self.inserts += 1
        return await super().insert_spend(e)


@pytest.fixture
async def records(tmp_path: Path) -> Flaky:
    store = Flaky(tmp_path / "ledger.sqlite3")
    await store.start()
    return store


def test_a_spooled_row_round_trips_exactly() -> None:
    row = entry("q", cost=2**62)
    assert decode(encode(row)) == row
    assert encode(row).endswith("\n") and encode(row).count("\n") == 1


async def test_append_fsyncs_the_file_and_on_creation_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = Spool(tmp_path / "spool")
    await spool.open()
    await spool.append(entry("q1"))
    first = list(synced)
    await spool.append(entry("q2"))

    path = str(tmp_path / "spool" / SPOOL_FILE)
    assert first == [path, str(tmp_path / "spool")]  # the file, then its new name
    assert synced[2:] == [path]
    assert spool.depth == 2


async def test_concurrent_appends_are_all_durable_in_few_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = os.fsync

    def fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spool = Spool(tmp_path)
    await asyncio.gather(*(spool.append(entry(f"q{i}")) for i in range(50)))
    lines = (tmp_path / SPOOL_FILE).read_text().splitlines()
    assert sorted(decode(line).request_id for line in lines) == sorted(f"q{i}" for i in range(50))
    assert calls < 50  # group commit


async def test_a_disk_failure_is_unavailable_not_an_ok(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    spool = Spool(tmp_path / "file")  # a file where the directory should be
    with pytest.raises(Unavailable, match="spool cannot be written"):
        await spool.append(entry("q"))


async def test_a_replay_cut_short_is_finished_by_the_next_without_double_counting(
    tmp_path: Path, records: Flaky
) -> None:
    spool = Spool(tmp_path / "spool")
    for i in range(5):
        await spool.append(entry(f"q{i}", cost=10 + i))
    records.fail_after = 2
    with pytest.raises(RecordsUnavailable):
        await spool.replay(records)
    await spool.append(entry("q5", cost=15))  # appends go on meanwhile, into a new file
    assert spool.depth == 6

    # A new process on the same directory (the first one crashed) finds everything.
    again = Spool(tmp_path / "spool")
    assert await again.open() == 6
    records.fail_after = None
    assert await again.replay(records) == (6, 0)
    assert again.depth == 0 and not list((tmp_path / "spool").iterdir())
    rows = await records.ledger_entries("team")
    assert sorted((r.request_id, r.cost_nanos) for r in rows) == [
        (f"q{i}", 10 + i) for i in range(6)
    ]
    assert await again.replay(records) == (0, 0)


async def test_a_line_torn_by_a_crash_is_skipped_and_the_next_ones_are_intact(
    tmp_path: Path, records: Flaky
) -> None:
    spool = Spool(tmp_path)
    await spool.append(entry("q1"))
    with (tmp_path / SPOOL_FILE).open("a") as out:  # a crash in the middle of a write
        out.write(encode(entry("torn"))[:40])
    again = Spool(tmp_path)  # the restarted process
    await again.open()
    await again.append(entry("q2"))
    assert await again.replay(records) == (2, 0)
    assert sorted(r.request_id for r in await records.ledger_entries("team")) == ["q1", "q2"]
