"""The embedded default's record store: one SQLite file, used from one worker thread.

sqlite3 is synchronous; every call runs on a single dedicated thread so the event loop
never blocks and the connection is only ever touched by the thread that made it.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
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
from server.storage.model_budgets import decode_model_budgets, encode_model_budgets
from server.storage.spend_sql import SQLITE, local_day, spend_report_sql, spend_row

T = TypeVar("T")

_TEAM_COLUMNS = (
    "team_id, team_alias, max_budget_nanos, budget_duration, tpm_limit, rpm_limit, models,"
    " metadata, blocked, created_at, soft_budget_nanos, member_budget_nanos,"
    " member_budget_duration, member_rpm_limit, member_tpm_limit, model_max_budget"
)
_TEAM_MARKS = ",".join("?" * 16)
# Every column but team_id and created_at (kept by update_team, as before).
_TEAM_UPDATE = (
    "team_alias=?, max_budget_nanos=?, budget_duration=?, tpm_limit=?, rpm_limit=?, models=?,"
    " metadata=?, blocked=?, soft_budget_nanos=?, member_budget_nanos=?,"
    " member_budget_duration=?, member_rpm_limit=?, member_tpm_limit=?, model_max_budget=?"
)
_KEY_COLUMNS = (
    "key_id, key_hash, key_prefix, team_id, key_alias, max_budget_nanos, budget_duration,"
    " expires_at, models, user_id, revoked_at, created_at, blocked, soft_budget_nanos,"
    " rpm_limit, tpm_limit, model_max_budget"
)
_KEY_MARKS = ",".join("?" * 17)
# The mutable fields only: hash, prefix, team, user, revocation and creation are kept.
_KEY_UPDATE = (
    "key_alias=?, max_budget_nanos=?, budget_duration=?, expires_at=?, models=?, blocked=?,"
    " soft_budget_nanos=?, rpm_limit=?, tpm_limit=?, model_max_budget=?"
)
_MEMBER_COLUMNS = (
    "team_id, user_id, max_budget_nanos, budget_duration, rpm_limit, tpm_limit, created_at"
)
_LEDGER_COLUMNS = (
    "request_id, team_id, key_id, cost_nanos, admitted_at, recorded_at, reservation_id, model,"
    " prompt_tokens, completion_tokens, metadata, user_id"
)


def migration_files() -> list[tuple[int, str]]:
    """The SQLite migrations shipped with budgetd, as (version, sql), in order."""
    folder = resources.files("server.storage") / "migrations" / "sqlite"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(found)


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
                        f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES ({_TEAM_MARKS})",
                        _team_row(team),
                    )
            except sqlite3.IntegrityError as exc:
                raise AlreadyExists(f"team {team.team_id!r} already exists") from exc
            return team

        return await self._run_conn(op)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        def op(conn: sqlite3.Connection) -> TeamRecord | None:
            row = conn.execute(
                f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id = ?", (team_id,)
            ).fetchone()
            return _team(row) if row else None

        return await self._run_conn(op)

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        def op(conn: sqlite3.Connection) -> list[TeamRecord]:
            rows = conn.execute(
                f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id > ? ORDER BY team_id LIMIT ?",
                (after_team_id, limit),
            ).fetchall()
            return [_team(row) for row in rows]

        return await self._run_conn(op)

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        def op(conn: sqlite3.Connection) -> TeamRecord:
            row = _team_row(team)
            with conn:
                cur = conn.execute(
                    f"UPDATE teams SET {_TEAM_UPDATE} WHERE team_id = ?",
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
                    f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES ({_TEAM_MARKS})"
                    " ON CONFLICT (team_id) DO NOTHING",
                    _team_row(team),
                )
            if cur.rowcount == 1:
                return team, True
            row = conn.execute(
                f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id = ?", (team.team_id,)
            ).fetchone()
            return _team(row), False

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
                    f"INSERT INTO team_members ({_MEMBER_COLUMNS}) VALUES (?,?,?,?,?,?,?)"
                    " ON CONFLICT (team_id, user_id) DO UPDATE SET"
                    " max_budget_nanos = excluded.max_budget_nanos,"
                    " budget_duration = excluded.budget_duration,"
                    " rpm_limit = excluded.rpm_limit, tpm_limit = excluded.tpm_limit"
                    f" RETURNING {_MEMBER_COLUMNS}",
                    _member_row(member),
                ).fetchone()
            return _member(row)

        return await self._run_conn(op)

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        def op(conn: sqlite3.Connection) -> MemberRecord | None:
            row = conn.execute(
                f"SELECT {_MEMBER_COLUMNS} FROM team_members WHERE team_id = ? AND user_id = ?",
                (team_id, user_id),
            ).fetchone()
            return None if row is None else _member(row)

        return await self._run_conn(op)

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        def op(conn: sqlite3.Connection) -> list[MemberRecord]:
            rows = conn.execute(
                f"SELECT {_MEMBER_COLUMNS} FROM team_members WHERE team_id = ? ORDER BY user_id",
                (team_id,),
            ).fetchall()
            return [_member(row) for row in rows]

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
                            f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES ({_KEY_MARKS})",
                            _key_row(key),
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
            row = _key_row(key)
            with conn:
                stored = conn.execute(
                    f"UPDATE api_keys SET {_KEY_UPDATE} WHERE key_id = ? RETURNING {_KEY_COLUMNS}",
                    (*row[4:9], *row[12:], key.key_id),
                ).fetchone()
            if stored is None:
                raise NotFound(f"key {key.key_id!r} not found")
            return _key(stored)

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
                    f"INSERT OR IGNORE INTO spend_ledger ({_LEDGER_COLUMNS})"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    _ledger_row(entry),
                )
            if cur.rowcount == 1:
                return LedgerInsert(True, entry)
            row = conn.execute(
                f"SELECT {_LEDGER_COLUMNS} FROM spend_ledger WHERE request_id = ?",
                (entry.request_id,),
            ).fetchone()
            return LedgerInsert(False, _ledger(row))

        return await self._run_conn(op)

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        def op(conn: sqlite3.Connection) -> LedgerInsert | None:
            row = conn.execute(
                f"SELECT {_LEDGER_COLUMNS} FROM spend_ledger WHERE request_id = ?", (request_id,)
            ).fetchone()
            return None if row is None else LedgerInsert(False, _ledger(row))

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
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE (? = '' OR team_id = ?)"
                " AND key_id > ? AND (? OR revoked_at IS NULL) ORDER BY key_id LIMIT ?",
                (team_id, team_id, after_key_id, include_revoked, limit),
            ).fetchall()
            return [_key(row) for row in rows]

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
                f"SELECT {_LEDGER_COLUMNS} FROM spend_ledger WHERE team_id = ?"
                " ORDER BY admitted_at",
                (team_id,),
            ).fetchall()
            return [_ledger(row) for row in rows]

        return await self._run_conn(op)

    async def _one_key(self, column: str, value: str) -> KeyRecord | None:
        def op(conn: sqlite3.Connection) -> KeyRecord | None:
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE {column} = ?", (value,)
            ).fetchone()
            return _key(row) if row else None

        return await self._run_conn(op)

    # -- thread plumbing -------------------------------------------------------------------

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level="DEFERRED", check_same_thread=True)
        # WAL + synchronous=FULL: a committed ledger row survives a crash of budgetd.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        self._conn = conn
        self.applied_migrations = tuple(self._migrate())

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _migrate(self) -> list[int]:
        conn = self._require()
        conn.execute(
            "CREATE TABLE IF NOT EXISTS budgetd_schema_migrations"
            " (version INTEGER PRIMARY KEY,"
            " applied_at REAL NOT NULL DEFAULT (strftime('%s', 'now')))"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM budgetd_schema_migrations")}
        applied = []
        for version, sql in migration_files():
            if version in done:
                continue
            # executescript commits first; wrap in an explicit transaction so a failed
            # migration leaves nothing half applied.
            conn.executescript(
                f"BEGIN;\n{sql}\nINSERT INTO budgetd_schema_migrations (version)"
                f" VALUES ({version});\nCOMMIT;"
            )
            applied.append(version)
        return applied

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


def _team_row(team: TeamRecord) -> tuple[Any, ...]:
    return (
        team.team_id,
        team.team_alias,
        team.max_budget_nanos,
        team.budget_duration,
        team.tpm_limit,
        team.rpm_limit,
        json.dumps(list(team.models)),
        json.dumps(team.metadata),
        int(team.blocked),
        team.created_at,
        team.soft_budget_nanos,
        team.member_budget_nanos,
        team.member_budget_duration,
        team.member_rpm_limit,
        team.member_tpm_limit,
        json.dumps(encode_model_budgets(team.model_max_budget)),
    )


def _team(row: tuple[Any, ...]) -> TeamRecord:
    return TeamRecord(
        team_id=row[0],
        team_alias=row[1],
        max_budget_nanos=row[2],
        budget_duration=row[3],
        tpm_limit=row[4],
        rpm_limit=row[5],
        models=tuple(json.loads(row[6])),
        metadata=json.loads(row[7]),
        blocked=bool(row[8]),
        created_at=row[9],
        soft_budget_nanos=row[10],
        member_budget_nanos=row[11],
        member_budget_duration=row[12],
        member_rpm_limit=row[13],
        member_tpm_limit=row[14],
        model_max_budget=decode_model_budgets(json.loads(row[15])),
    )


def _key_row(key: KeyRecord) -> tuple[Any, ...]:
    return (
        key.key_id,
        key.key_hash,
        key.key_prefix,
        key.team_id,
        key.key_alias,
        key.max_budget_nanos,
        key.budget_duration,
        key.expires_at,
        json.dumps(list(key.models)),
        key.user_id,
        key.revoked_at,
        key.created_at,
        int(key.blocked),
        key.soft_budget_nanos,
        key.rpm_limit,
        key.tpm_limit,
        json.dumps(encode_model_budgets(key.model_max_budget)),
    )


def _key(row: tuple[Any, ...]) -> KeyRecord:
    return KeyRecord(
        key_id=row[0],
        key_hash=row[1],
        key_prefix=row[2],
        team_id=row[3],
        key_alias=row[4],
        max_budget_nanos=row[5],
        budget_duration=row[6],
        expires_at=row[7],
        models=tuple(json.loads(row[8])),
        user_id=row[9],
        revoked_at=row[10],
        created_at=row[11],
        blocked=bool(row[12]),
        soft_budget_nanos=row[13],
        rpm_limit=row[14],
        tpm_limit=row[15],
        model_max_budget=decode_model_budgets(json.loads(row[16])),
    )


def _member_row(member: MemberRecord) -> tuple[Any, ...]:
    return (
        member.team_id,
        member.user_id,
        member.max_budget_nanos,
        member.budget_duration,  # None: the team's member_budget_duration
        member.rpm_limit,
        member.tpm_limit,
        member.created_at,
    )


def _member(row: tuple[Any, ...]) -> MemberRecord:
    return MemberRecord(
        team_id=row[0],
        user_id=row[1],
        max_budget_nanos=row[2],
        budget_duration=row[3],
        rpm_limit=row[4],
        tpm_limit=row[5],
        created_at=row[6],
    )


def _ledger_row(entry: LedgerEntry) -> tuple[Any, ...]:
    return (
        entry.request_id,
        entry.team_id,
        entry.key_id,
        entry.cost_nanos,
        entry.admitted_at,
        entry.recorded_at,
        entry.reservation_id,
        entry.model,
        entry.prompt_tokens,
        entry.completion_tokens,
        json.dumps(entry.metadata),
        entry.user_id,
    )


def _ledger(row: tuple[Any, ...]) -> LedgerEntry:
    return LedgerEntry(
        request_id=row[0],
        team_id=row[1],
        key_id=row[2],
        cost_nanos=row[3],
        admitted_at=row[4],
        recorded_at=row[5],
        reservation_id=row[6],
        model=row[7],
        prompt_tokens=row[8],
        completion_tokens=row[9],
        metadata=json.loads(row[10]),
        user_id=row[11],
    )
