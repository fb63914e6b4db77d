"""The embedded default's record store: one SQLite file, used from one worker thread.

sqlite3 is synchronous; every call runs on a single dedicated thread so the event loop
never blocks and the connection is only ever touched by the thread that made it. The
statements are here; the rows' column lists and conversions are in
:mod:`server.storage.sqlite_rows`, and opening the file and its migrations in
:mod:`server.storage.sqlite_schema`.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from server.errors import AlreadyExists, NotFound, Unavailable
from server.storage.base import (
    KeyRecord,
    LedgerEntry,
    LedgerInsert,
    MemberRecord,
    ScopeKind,
    SpendQuery,
    SpendRow,
    SpendSum,
    TeamRecord,
)
from server.storage.spend_sql import SQLITE, local_day, spend_report_sql, spend_row
from server.storage.sqlite_rows import (
    KEY_COLUMNS,
    KEY_MARKS,
    KEY_UPDATE,
    LEDGER_COLUMNS,
    MEMBER_COLUMNS,
    TEAM_COLUMNS,
    TEAM_MARKS,
    TEAM_UPDATE,
    key_args,
    key_from_row,
    ledger_args,
    ledger_from_row,
    member_args,
    member_from_row,
    team_args,
    team_from_row,
)
from server.storage.sqlite_schema import apply_migrations, open_database

T = TypeVar("T")


class SqliteRecords:
    """RecordStore on a SQLite file (the embedded default, one instance)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budgetd-sqlite")
        self._conn: sqlite3.Connection | None = None
        self.applied_migrations: tuple[int, ...] = ()

    async def start(self) -> None:
        """Open the file (creating its folder) and apply pending migrations."""
        await self._run(self._open)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""
        return await self._run(self._migrate)

    async def instance_secret(self) -> bytes:
        def op(conn: sqlite3.Connection) -> bytes:
            with conn:
                conn.execute(
                    "INSERT OR IGNORE INTO budgetd_settings (name, value) VALUES (?, ?)",
                    ("instance_secret", secrets.token_hex(32)),
                )
            row = conn.execute(
                "SELECT value FROM budgetd_settings WHERE name = 'instance_secret'"
            ).fetchone()
            return bytes.fromhex(row[0])

        return await self._run_conn(op)

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        def op(conn: sqlite3.Connection) -> TeamRecord:
            try:
                with conn:
                    conn.execute(
                        f"INSERT INTO teams ({TEAM_COLUMNS}) VALUES ({TEAM_MARKS})",
                        team_args(team),
                    )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"team {team.team_id!r} already exists") from exc
            return team

        return await self._run_conn(op)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        def op(conn: sqlite3.Connection) -> TeamRecord | None:
            row = conn.execute(
                f"SELECT {TEAM_COLUMNS} FROM teams WHERE team_id = ?", (team_id,)
            ).fetchone()
            return team_from_row(row) if row else None

        return await self._run_conn(op)

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        def op(conn: sqlite3.Connection) -> list[TeamRecord]:
            rows = conn.execute(
                f"SELECT {TEAM_COLUMNS} FROM teams WHERE team_id > ? ORDER BY team_id LIMIT ?",
                (after_team_id, limit),
            ).fetchall()
            return [team_from_row(row) for row in rows]

        return await self._run_conn(op)

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        def op(conn: sqlite3.Connection) -> TeamRecord:
            row = team_args(team)
            with conn:
                cur = conn.execute(
                    f"UPDATE teams SET {TEAM_UPDATE} WHERE team_id = ?",
                    (*row[1:9], *row[10:], team.team_id),
                )
            if cur.rowcount == 0:
                raise NotFound(f"team {team.team_id!r} not found")
            return team

        return await self._run_conn(op)

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        """Insert a team unless its team_id exists (one thread: no race to lose)."""

        def op(conn: sqlite3.Connection) -> tuple[TeamRecord, bool]:
            with conn:
                cur = conn.execute(
                    f"INSERT INTO teams ({TEAM_COLUMNS}) VALUES ({TEAM_MARKS})"
                    " ON CONFLICT (team_id) DO NOTHING",
                    team_args(team),
                )
            if cur.rowcount == 1:
                return team, True
            row = conn.execute(
                f"SELECT {TEAM_COLUMNS} FROM teams WHERE team_id = ?", (team.team_id,)
            ).fetchone()
            return team_from_row(row), False

        return await self._run_conn(op)

    async def upsert_member(self, member: MemberRecord) -> MemberRecord:
        """Insert or replace a membership (keeping its created_at); NotFound without the team."""

        def op(conn: sqlite3.Connection) -> MemberRecord:
            if not conn.execute(
                "SELECT 1 FROM teams WHERE team_id = ?", (member.team_id,)
            ).fetchone():
                raise NotFound(f"team {member.team_id!r} not found")
            with conn:
                row = conn.execute(
                    f"INSERT INTO team_members ({MEMBER_COLUMNS}) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT (team_id, user_id) DO UPDATE SET"
                    " max_budget_nanos = excluded.max_budget_nanos,"
                    " budget_duration = excluded.budget_duration,"
                    " rpm_limit = excluded.rpm_limit, tpm_limit = excluded.tpm_limit"
                    f" RETURNING {MEMBER_COLUMNS}",
                    member_args(member),
                ).fetchone()
            return member_from_row(row)

        return await self._run_conn(op)

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        def op(conn: sqlite3.Connection) -> MemberRecord | None:
            row = conn.execute(
                f"SELECT {MEMBER_COLUMNS} FROM team_members WHERE team_id = ? AND user_id = ?",
                (team_id, user_id),
            ).fetchone()
            return None if row is None else member_from_row(row)

        return await self._run_conn(op)

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        def op(conn: sqlite3.Connection) -> list[MemberRecord]:
            rows = conn.execute(
                f"SELECT {MEMBER_COLUMNS} FROM team_members WHERE team_id = ? ORDER BY user_id",
                (team_id,),
            ).fetchall()
            return [member_from_row(row) for row in rows]

        return await self._run_conn(op)

    async def delete_member(self, team_id: str, user_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            with conn:
                cur = conn.execute(
                    "DELETE FROM team_members WHERE team_id = ? AND user_id = ?",
                    (team_id, user_id),
                )
            return cur.rowcount > 0

        return await self._run_conn(op)

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        def op(conn: sqlite3.Connection) -> KeyRecord:
            if conn.execute("SELECT 1 FROM teams WHERE team_id = ?", (key.team_id,)).fetchone():
                try:
                    with conn:
                        conn.execute(
                            f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES ({KEY_MARKS})",
                            key_args(key),
                        )
                except sqlite3.IntegrityError as exc:
                    raise AlreadyExists(f"key {key.key_id!r} already exists") from exc
                return key
            raise NotFound(f"team {key.team_id!r} not found")

        return await self._run_conn(op)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self._one_key("key_id", key_id)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._one_key("key_hash", key_hash)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replace a key's mutable fields; the stored key (hash, team, revocation kept)."""

        def op(conn: sqlite3.Connection) -> KeyRecord:
            row = key_args(key)
            with conn:
                stored = conn.execute(
                    f"UPDATE api_keys SET {KEY_UPDATE} WHERE key_id = ? RETURNING {KEY_COLUMNS}",
                    (*row[4:9], *row[12:], key.key_id),
                ).fetchone()
            if stored is None:
                raise NotFound(f"key {key.key_id!r} not found")
            return key_from_row(stored)

        return await self._run_conn(op)

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        def op(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE key_id = ?",
                    (at, key_id),
                )

        await self._run_conn(op)
        return await self.get_key(key_id)

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        def op(conn: sqlite3.Connection) -> LedgerInsert:
            with conn:
                cur = conn.execute(
                    f"INSERT OR IGNORE INTO spend_ledger ({LEDGER_COLUMNS})"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    ledger_args(entry),
                )
            if cur.rowcount == 1:
                return LedgerInsert(True, entry)
            row = conn.execute(
                f"SELECT {LEDGER_COLUMNS} FROM spend_ledger WHERE request_id = ?",
                (entry.request_id,),
            ).fetchone()
            return LedgerInsert(False, ledger_from_row(row))

        return await self._run_conn(op)

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        def op(conn: sqlite3.Connection) -> LedgerInsert | None:
            row = conn.execute(
                f"SELECT {LEDGER_COLUMNS} FROM spend_ledger WHERE request_id = ?", (request_id,)
            ).fetchone()
            return None if row is None else LedgerInsert(False, ledger_from_row(row))

        return await self._run_conn(op)

    async def sum_spend(
        self,
        kind: ScopeKind,
        scope_id: str,
        start: float,
        end: float | None,
        *,
        user_id: str = "",
        model: str = "",
    ) -> int:
        """Exact sum of a scope's costs admitted in ``[start, end)``; see RecordStore.

        Served by the (team_id | key_id [, user_id | model], admitted_at) indexes.
        """
        column = "key_id" if kind is ScopeKind.KEY else "team_id"  # TEAM and MEMBER: the team
        sql = (
            f"SELECT COALESCE(SUM(cost_nanos), 0) FROM spend_ledger WHERE {column} = ?"
            " AND admitted_at >= ? AND admitted_at < ?"
        )
        params: list[Any] = [scope_id, start, float("inf") if end is None else end]
        for name, value in (("user_id", user_id), ("model", model)):
            if value:
                sql += f" AND {name} = ?"
                params.append(value)

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, params).fetchone()[0])

        return await self._run_conn(op)

    async def sum_spend_as_of(
        self,
        kind: ScopeKind,
        scope_id: str,
        start: float,
        end: float | None,
        *,
        user_id: str = "",
        model: str = "",
    ) -> SpendSum:
        """:meth:`sum_spend`; no snapshot: one process, whose counters cannot vanish under it."""
        total = await self.sum_spend(kind, scope_id, start, end, user_id=user_id, model=model)
        return SpendSum(total)

    # -- listings and reports (issue 6) ------------------------------------------------------

    async def list_keys(
        self, team_id: str, after_key_id: str, limit: int, *, include_revoked: bool = False
    ) -> list[KeyRecord]:
        """Up to ``limit`` keys ordered by key_id after ``after_key_id`` ("" team: all)."""

        def op(conn: sqlite3.Connection) -> list[KeyRecord]:
            rows = conn.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE (? = '' OR team_id = ?)"
                " AND key_id > ? AND (? OR revoked_at IS NULL) ORDER BY key_id LIMIT ?",
                (team_id, team_id, after_key_id, include_revoked, limit),
            ).fetchall()
            return [key_from_row(row) for row in rows]

        return await self._run_conn(op)

    async def spend_report(self, query: SpendQuery) -> list[SpendRow]:
        """Exact ledger sums over ``[query.start, query.end)`` per group (see RecordStore)."""
        sql, params = spend_report_sql(SQLITE, query, query.start, query.end)

        def op(conn: sqlite3.Connection) -> list[SpendRow]:
            # Registered per call: cheap, and it keeps the connection's setup untouched.
            conn.create_function("budgetd_local_day", 2, local_day, deterministic=True)
            return [spend_row(row, int(row[0])) for row in conn.execute(sql, params)]

        return await self._run_conn(op)

    async def ledger_entries(self, team_id: str) -> list[LedgerEntry]:
        """Every ledger row of a team (for tests and reports)."""

        def op(conn: sqlite3.Connection) -> list[LedgerEntry]:
            rows = conn.execute(
                f"SELECT {LEDGER_COLUMNS} FROM spend_ledger WHERE team_id = ? ORDER BY admitted_at",
                (team_id,),
            ).fetchall()
            return [ledger_from_row(row) for row in rows]

        return await self._run_conn(op)

    async def _one_key(self, column: str, value: str) -> KeyRecord | None:
        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                f"SELECT {KEY_COLUMNS} FROM api_keys WHERE {column} = ?", (value,)
            ).fetchone()
            return key_from_row(row) if row else None

        return await self._run_conn(op)

    # -- thread plumbing -------------------------------------------------------------------

    def _open(self) -> None:
        self._conn = open_database(self._path)
        self.applied_migrations = tuple(self._migrate())

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _migrate(self) -> list[int]:
        return apply_migrations(self._require())

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise Unavailable("sqlite store is not open")
        return self._conn

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._require())
            except sqlite3.OperationalError as exc:
                raise Unavailable(f"sqlite unavailable: {exc}") from exc

        return await self._run(call)
