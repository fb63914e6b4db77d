"""The spend spool: acknowledged spend kept on local disk while Postgres is down.

With ``budgetd.postgres_down: spool`` a RecordSpend that cannot reach the ledger appends its
row here and answers OK only once the row is on disk: :meth:`Spool.append` writes one JSON
line and fsyncs the file (and, when it creates the file, the directory, so the file's name
is durable too) before it returns. :meth:`Spool.replay` later inserts every spooled row into
the ledger, in order.

Files in the spool directory:

* ``spool.jsonl``: rows appended since the last replay began;
* ``replaying-<n>.jsonl``: rows being replayed. A replay first renames ``spool.jsonl`` to
  such a file (an atomic rename, so appends carry on into a fresh ``spool.jsonl``), inserts
  its rows, and deletes it only when every row is in the ledger. A crash or an outage mid-way
  leaves it in place, and the next replay inserts its rows again: inserting is idempotent
  (``request_id`` is unique in the ledger), so nothing is counted twice;
* ``conflicts.jsonl``: spooled rows whose request_id the ledger already holds with another
  cost, key or user (the same id recorded twice with different costs while Postgres was
  down, on this replica or another). The ledger keeps its row; these are logged and kept
  for an operator.

Money stays exact: costs are integer nano-USD in the JSON. Instants are JSON floats, which
round-trip exactly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from server.errors import Unavailable
from server.storage.base import LedgerEntry, LedgerInsert, RecordStore

log = logging.getLogger("budgetd.spool")

SPOOL_FILE: Final = "spool.jsonl"
CONFLICTS_FILE: Final = "conflicts.jsonl"
_REPLAYING: Final = re.compile(r"^replaying-(\d+)\.jsonl$")
# Files one replay call works through at most (appends may keep coming meanwhile).
_REPLAY_ROUNDS = 10
# Brings the counters up to date with a row just replayed into the ledger.
Settle = Callable[[LedgerEntry, LedgerInsert], Awaitable[None]]


def encode(entry: LedgerEntry) -> str:
    """One ledger row as one JSON line (ending in a newline)."""
    return json.dumps(asdict(entry), separators=(",", ":"), sort_keys=True) + "\n"


def decode(line: str) -> LedgerEntry:
    """A spooled line back as the ledger row it was."""
    data: dict[str, Any] = json.loads(line)
    return LedgerEntry(**data)


def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a created, renamed or deleted file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append_lines(path: Path, lines: list[str]) -> None:
    """Append and fsync; fsync the directory too when the file is new. Blocking."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True)
        _fsync_dir(path.parent.parent)
    created = not path.exists()
    data = "".join(lines).encode("utf-8")
    with path.open("a+b") as out:
        end = out.seek(0, os.SEEK_END)
        if end:
            out.seek(end - 1)
            if out.read(1) != b"\n":
                # A line torn by a crash mid-write (so never acknowledged) ends here, not
                # glued to the first of these.
                data = b"\n" + data
        out.write(data)  # append mode: at the end, wherever the reads left the position
        out.flush()
        os.fsync(out.fileno())
    if created:
        _fsync_dir(path.parent)


def _count_lines(path: Path) -> int:
    with path.open("rb") as data:
        return sum(1 for line in data if line.strip())


class Spool:
    """An append-only, fsynced file of ledger rows waiting for Postgres, and their replay.

    Appends are serialized and run in a worker thread, so the event loop never waits on the
    disk. Appends that arrive while one is being written are written together with one fsync
    (group commit): each still returns only after its own line is durable.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = asyncio.Lock()  # one writer of spool.jsonl at a time (flush, rotate)
        self._replay_lock = asyncio.Lock()  # one replay at a time
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._depth = 0

    @property
    def depth(self) -> int:
        """Rows spooled and not yet replayed (for the ``budgetd_spool_depth`` gauge)."""
        return self._depth

    async def open(self) -> int:
        """Create the directory if needed and count what earlier runs left; returns that."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)
        counts = [await asyncio.to_thread(_count_lines, path) for path in self._files()]
        self._depth = sum(counts)
        return self._depth

    async def append(self, entry: LedgerEntry) -> None:
        """Write ``entry`` to the spool; returns once it is fsynced to disk."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((encode(entry), done))
        if self._flusher is None or self._flusher.done():
            # A task of its own: a caller that gives up (its deadline) cancels only its
            # wait, never a write other callers are waiting for.
            self._flusher = asyncio.ensure_future(self._flush())
        try:
            await done
        except OSError as exc:
            # Neither Postgres nor the disk can keep this spend: not acknowledged, retry.
            raise Unavailable(f"postgres is down and the spool cannot be written: {exc}") from exc

    async def close(self) -> None:
        """Wait for writes in progress."""
        if self._flusher is not None:
            await self._flusher

    async def _flush(self) -> None:
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, []
                lines = [line for line, _ in batch]
                try:
                    await asyncio.to_thread(_append_lines, self._path, lines)
                except Exception as exc:  # the disk failed: every caller of the batch hears
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self._depth += len(batch)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def replay(self, records: RecordStore, settle: Settle | None = None) -> tuple[int, int]:
        """Insert every spooled row into the ledger; returns (replayed, conflicts).

        A row counts as replayed when it is inserted or the ledger already has it with the
        same cost, key and user; one with another cost, key or user goes to
        ``conflicts.jsonl``. After each replayed row, ``settle`` (if given) brings the
        counters up to date with it: a crash between the spool's fsync and the counters'
        update left them without it.
        Files are deleted once all their rows are done. Raises Unavailable (leaving the rest
        for the next replay, which inserts again what is already in: idempotent) when a
        store is down.
        """
        async with self._replay_lock:
            replayed = conflicts = 0
            for _ in range(_REPLAY_ROUNDS):
                # Files left by a replay cut short go first, and only then is spool.jsonl
                # moved aside: an outage stops the replay before it makes another file.
                pending = self._files(replaying_only=True)
                if not pending:
                    await self._rotate()
                    pending = self._files(replaying_only=True)
                if not pending:
                    break
                for path in pending:
                    done, clashed = await self._replay_file(path, records, settle)
                    replayed += done
                    conflicts += clashed
            return replayed, conflicts

    async def _rotate(self) -> None:
        """Move spool.jsonl aside to be replayed (appends continue into a new file)."""
        async with self._lock:
            if not self._path.exists():
                return
            names = [path.name for path in self._files(replaying_only=True)]
            taken = [int(match[1]) for name in names if (match := _REPLAYING.match(name))]
            target = self.directory / f"replaying-{max(taken, default=0) + 1:09d}.jsonl"
            await asyncio.to_thread(self._rename, self._path, target)

    @staticmethod
    def _rename(source: Path, target: Path) -> None:
        source.rename(target)
        _fsync_dir(target.parent)

    async def _replay_file(
        self, path: Path, records: RecordStore, settle: Settle | None
    ) -> tuple[int, int]:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        conflicts: list[str] = []
        replayed = 0
        for line in lines:
            try:
                entry = decode(line)
            except (ValueError, TypeError):
                # Only a write cut short by a crash leaves such a line, and its RecordSpend
                # was never answered (an answer waits for the whole line and its fsync).
                log.warning("skipping a torn spool line (never acknowledged): %.200r", line)
                continue
            stored = await records.insert_spend(entry)  # Unavailable: stop, replay it again later
            found = stored.entry
            if not stored.inserted and (
                found.cost_nanos != entry.cost_nanos
                or found.key_id != entry.key_id
                or found.user_id != entry.user_id
            ):
                log.error(
                    "spooled spend of request_id %r conflicts with the ledger (ledger: cost %d"
                    " nano-USD, key %s, user %r; spool: cost %d, key %s, user %r): kept in %s",
                    entry.request_id, found.cost_nanos, found.key_id, found.user_id,
                    entry.cost_nanos, entry.key_id, entry.user_id,
                    self.directory / CONFLICTS_FILE,
                )  # fmt: skip
                conflicts.append(line + "\n")
            else:
                replayed += 1
                if settle is not None:
                    await settle(entry, stored)
        if conflicts:
            await asyncio.to_thread(_append_lines, self.directory / CONFLICTS_FILE, conflicts)
        await asyncio.to_thread(self._delete, path)
        self._depth = max(0, self._depth - len(lines))
        log.info("replayed %d spooled spends from %s into the ledger", replayed, path.name)
        return replayed, len(conflicts)

    @staticmethod
    def _delete(path: Path) -> None:
        path.unlink()
        _fsync_dir(path.parent)

    @property
    def _path(self) -> Path:
        return self.directory / SPOOL_FILE

    def _files(self, *, replaying_only: bool = False) -> list[Path]:
        """Spool files in replay order: the ones being replayed first, oldest first."""
        if not self.directory.is_dir():
            return []
        replaying = sorted(p for p in self.directory.iterdir() if _REPLAYING.match(p.name))
        if replaying_only or not self._path.exists():
            return replaying
        return [*replaying, self._path]
