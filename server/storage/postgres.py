"""The Postgres record store (asyncpg): teams, hashed keys and the append-only spend ledger.

Money is NUMERIC(30, 9) in the database and integer nano-USD in records, converted exactly
through :mod:`server.money`; instants are timestamptz in the database and Unix seconds in
records. Every method reaches Postgres through one context manager that turns
connection-level failures into :class:`~server.errors.Unavailable`, so a database outage
reaches callers as UNAVAILABLE and is never mistaken for a denial or a bug.

Schema changes are the numbered ``migrations/postgres/NNNN_*.sql`` files, applied in order,
each in its own transaction under a transaction-level advisory lock so that replicas
starting together apply each one exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, Final, TypeVar

import asyncpg
from asyncpg import exceptions as pg_errors
from asyncpg.pool import PoolConnectionProxy

from server.errors import AlreadyExists, InvalidArgument, NotFound, RecordsUnavailable, Unavailable
from server.money import decimal_to_nanos, nanos_to_decimal
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
from server.storage.batching import Batcher
from server.storage.model_budgets import decode_model_budgets, encode_model_budgets
from server.storage.spend_sql import POSTGRES, spend_report_sql, spend_row

_In = TypeVar("_In")
_Out = TypeVar("_Out")

# Failures of the connection rather than of the statement: the database is unreachable,
# shutting down, out of connections or too slow. (In Python 3.11 asyncio.TimeoutError is
# TimeoutError, an OSError; both are named for the reader.)
_UNAVAILABLE_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    pg_errors.PostgresConnectionError,  # SQLSTATE class 08, incl. ConnectionDoesNotExistError
    pg_errors.InterfaceError,  # closed connection or pool
    pg_errors.OperatorInterventionError,  # class 57: CannotConnectNow, admin/crash shutdown
    pg_errors.InsufficientResourcesError,  # class 53: TooManyConnections, out of memory/disk
)

# Any fixed 64-bit number, shared by every budgetd replica: "budgetd" in ASCII.
_MIGRATION_LOCK_ID: Final = int.from_bytes(b"budgetd", "big")
_MIGRATION_FILE: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_SECRET_SETTING: Final = "instance_secret"
_KEY_HASH_CONSTRAINT: Final = "api_keys_key_hash_key"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# --- Migrations ------------------------------------------------------------------------
_SQL_LOCK_MIGRATIONS: Final = "SELECT pg_advisory_xact_lock($1)"
_SQL_CREATE_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS budgetd_schema_migrations (
    version    int PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
_SQL_APPLIED_VERSIONS: Final = "SELECT version FROM budgetd_schema_migrations"
_SQL_IS_APPLIED: Final = "SELECT true FROM budgetd_schema_migrations WHERE version = $1"
_SQL_RECORD_MIGRATION: Final = (
    "INSERT INTO budgetd_schema_migrations (version, applied_at) VALUES ($1, now())"
)

# --- Settings --------------------------------------------------------------------------
_SQL_INSERT_SETTING: Final = (
    "INSERT INTO budgetd_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
)
_SQL_GET_SETTING: Final = "SELECT value FROM budgetd_settings WHERE name = $1"

# --- Teams -----------------------------------------------------------------------------
_TEAM_COLUMNS: Final = (
    "team_id, team_alias, max_budget, budget_duration, tpm_limit, rpm_limit, models,"
    " metadata, blocked, created_at, soft_budget, member_budget, member_budget_duration,"
    " member_rpm_limit, member_tpm_limit, model_max_budget"
)
_TEAM_VALUES: Final = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16"
_SQL_INSERT_TEAM: Final = (
    f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES ({_TEAM_VALUES}) RETURNING {_TEAM_COLUMNS}"
)
# The JWT upsert: nothing is written (and nothing returned) when the team exists already.
_SQL_INSERT_TEAM_IF_ABSENT: Final = (
    f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES ({_TEAM_VALUES})"
    f" ON CONFLICT (team_id) DO NOTHING RETURNING {_TEAM_COLUMNS}"
)
_SQL_GET_TEAM: Final = f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id = $1"
_SQL_LIST_TEAMS: Final = (
    f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id > $1 ORDER BY team_id LIMIT $2"
)
_SQL_UPDATE_TEAM: Final = f"""
UPDATE teams SET team_alias = $2, max_budget = $3, budget_duration = $4, tpm_limit = $5,
    rpm_limit = $6, models = $7, metadata = $8, blocked = $9, created_at = $10,
    soft_budget = $11, member_budget = $12, member_budget_duration = $13,
    member_rpm_limit = $14, member_tpm_limit = $15, model_max_budget = $16
WHERE team_id = $1
RETURNING {_TEAM_COLUMNS}"""

# --- Keys ------------------------------------------------------------------------------
_KEY_COLUMNS: Final = (
    "key_id, key_hash, key_prefix, team_id, key_alias, max_budget, budget_duration,"
    " expires_at, models, user_id, revoked_at, created_at, blocked, soft_budget, rpm_limit,"
    " tpm_limit, model_max_budget"
)
_SQL_INSERT_KEY: Final = (
    f"INSERT INTO api_keys ({_KEY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    f" RETURNING {_KEY_COLUMNS}"
)
# The mutable fields only: hash, prefix, team, user, revocation and creation are kept.
_SQL_UPDATE_KEY: Final = f"""
UPDATE api_keys SET key_alias = $2, max_budget = $3, budget_duration = $4, expires_at = $5,
    models = $6, blocked = $7, soft_budget = $8, rpm_limit = $9, tpm_limit = $10,
    model_max_budget = $11
WHERE key_id = $1
RETURNING {_KEY_COLUMNS}"""
_SQL_GET_KEY: Final = f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = $1"
_SQL_GET_KEY_BY_HASH: Final = f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
_SQL_REVOKE_KEY: Final = (
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE key_id = $1"
    f" RETURNING {_KEY_COLUMNS}"
)

# --- Team members ----------------------------------------------------------------------
_MEMBER_COLUMNS: Final = (
    "team_id, user_id, max_budget, budget_duration, rpm_limit, tpm_limit, created_at"
)
# A replaced membership keeps the instant it was first created.
_SQL_UPSERT_MEMBER: Final = f"""
INSERT INTO team_members ({_MEMBER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (team_id, user_id) DO UPDATE SET max_budget = EXCLUDED.max_budget,
    budget_duration = EXCLUDED.budget_duration, rpm_limit = EXCLUDED.rpm_limit,
    tpm_limit = EXCLUDED.tpm_limit
RETURNING {_MEMBER_COLUMNS}"""
_SQL_GET_MEMBER: Final = (
    f"SELECT {_MEMBER_COLUMNS} FROM team_members WHERE team_id = $1 AND user_id = $2"
)
_SQL_LIST_MEMBERS: Final = (
    f"SELECT {_MEMBER_COLUMNS} FROM team_members WHERE team_id = $1 ORDER BY user_id"
)
_SQL_DELETE_MEMBER: Final = (
    "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2 RETURNING true"
)

# --- Spend ledger ----------------------------------------------------------------------
_LEDGER_COLUMNS: Final = (
    "request_id, team_id, key_id, cost, admitted_at, recorded_at, reservation_id, model,"
    " prompt_tokens, completion_tokens, metadata, user_id"
)
# xact (migration 0002) is filled by its column default: the writing transaction's id.
_SQL_INSERT_SPEND: Final = (
    f"INSERT INTO spend_ledger ({_LEDGER_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    f" ON CONFLICT (request_id) DO NOTHING RETURNING {_LEDGER_COLUMNS}, xact"
)
_SQL_GET_SPEND: Final = f"SELECT {_LEDGER_COLUMNS}, xact FROM spend_ledger WHERE request_id = $1"
# Group commit (issue 7): the rows of concurrent insert_spend calls as one statement, so one
# transaction and one commit. Every row of it gets the same xact, which is right: they
# become visible together. One array per column, in _ledger_args' order; the statement's
# text does not depend on the number of rows, so it is prepared once per connection.
_SQL_INSERT_SPENDS: Final = (
    f"INSERT INTO spend_ledger ({_LEDGER_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[],"
    " $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[], $9::bigint[],"
    " $10::bigint[], $11::jsonb[], $12::text[])"
    f" ON CONFLICT (request_id) DO NOTHING RETURNING {_LEDGER_COLUMNS}, xact"
)
_SQL_GET_SPENDS: Final = (
    f"SELECT {_LEDGER_COLUMNS}, xact FROM spend_ledger WHERE request_id = ANY($1::text[])"
)
# Rows per statement, and statements at once (each holds a pooled connection while it runs;
# two keep one committing while the next batch forms, and leave the pool to everyone else).
_LEDGER_BATCH: Final = 256
_LEDGER_FLUSHES: Final = 2


def _sum_spend_sql(scope: str, *, by_user: bool, by_model: bool, as_of: bool) -> str:
    """One fixed statement per shape, each served by an index on (its columns, admitted_at):
    (team_id | key_id), (team_id, user_id) or (team_id | key_id, model). A NULL end ($3)
    means no upper bound; $4 is the user, then the model. ``as_of`` adds the snapshot of
    the statement that summed (a rebuilt counter keeps it)."""
    select = "COALESCE(SUM(cost), 0)" + (", pg_current_snapshot()::text" if as_of else "")
    where = [
        f"{scope} = $1",
        "admitted_at >= $2",
        "admitted_at < COALESCE($3::timestamptz, 'infinity')",
    ]
    if by_user:
        where.append("user_id = $4")
    if by_model:
        where.append(f"model = ${5 if by_user else 4}")
    return f"SELECT {select} FROM spend_ledger WHERE {' AND '.join(where)}"


# (scope column, by user, by model, as of) -> the statement.
_SQL_SUM_SPEND: Final = {
    (scope, by_user, by_model, as_of): _sum_spend_sql(
        scope, by_user=by_user, by_model=by_model, as_of=as_of
    )
    for scope in ("team_id", "key_id")
    for by_user in (False, True)
    for by_model in (False, True)
    for as_of in (False, True)
}

# --- Listings (issue 6) ----------------------------------------------------------------
_SQL_LIST_KEYS: Final = (
    f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE ($1 = '' OR team_id = $1) AND key_id > $2"
    " AND ($3 OR revoked_at IS NULL) ORDER BY key_id LIMIT $4"
)


@asynccontextmanager
async def _driver_errors(
    error: type[Unavailable] = RecordsUnavailable,
) -> AsyncIterator[None]:
    """Translate connection-level driver failures into ``error`` (the one place that does).

    The record store reports :class:`RecordsUnavailable` (the source of truth is down, which
    the decision path may ride out); the Postgres counter store passes plain Unavailable.
    """
    try:
        yield
    except _UNAVAILABLE_ERRORS as exc:
        raise _unavailable(exc, error) from exc


def _unavailable(exc: BaseException, error: type[Unavailable] = RecordsUnavailable) -> Unavailable:
    """The ``error`` that reports the connection-level failure ``exc``."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return error(f"postgres unavailable: {detail}")


async def keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pools' release hook: nothing to undo, so no round trip.

    asyncpg's default reset sends four statements (unlock advisory locks, close cursors,
    UNLISTEN, RESET ALL) every time a connection goes back to the pool: one more round trip
    per query. budgetd keeps no session state: its advisory locks are transaction-level, it
    never LISTENs, SETs or leaves a cursor open; and asyncpg rolls back an open transaction
    before calling this.
    """


def _load_migrations() -> list[tuple[int, str]]:
    """The packaged migrations as (version, sql), ordered by version."""
    folder = resources.files("server.storage") / "migrations" / "postgres"
    found: dict[int, str] = {}
    for item in folder.iterdir():
        match = _MIGRATION_FILE.match(item.name)
        if match is None:
            continue
        version = int(match[1])
        if version in found:
            raise RuntimeError(f"two postgres migrations have version {version}")
        found[version] = item.read_text(encoding="utf-8")
    return sorted(found.items())


async def migrate(dsn: str) -> list[int]:
    """Apply the pending migrations to the database at ``dsn``; return the versions applied.

    Safe to run from several replicas at once: each migration runs in its own transaction
    holding an advisory lock, and re-checks under the lock whether it is still pending.
    Uses its own connection with no statement timeout, since a migration (or the wait for
    another replica's) may legitimately take longer than a request.
    """
    migrations = _load_migrations()  # outside _driver_errors: a missing file is not an outage
    async with _driver_errors():
        conn = await asyncpg.connect(dsn)
        try:
            return await _apply_migrations(conn, migrations)
        finally:
            await conn.close()


async def _apply_migrations(
    conn: asyncpg.Connection[asyncpg.Record], migrations: list[tuple[int, str]]
) -> list[int]:
    async with conn.transaction():  # the lock makes CREATE TABLE IF NOT EXISTS race-free
        await conn.execute(_SQL_LOCK_MIGRATIONS, _MIGRATION_LOCK_ID)
        await conn.execute(_SQL_CREATE_MIGRATIONS_TABLE)
        done = {row["version"] for row in await conn.fetch(_SQL_APPLIED_VERSIONS)}
    applied: list[int] = []
    for version, sql in migrations:
        if version in done:
            continue
        async with conn.transaction():
            await conn.execute(_SQL_LOCK_MIGRATIONS, _MIGRATION_LOCK_ID)
            # Another replica may have applied it while we waited for the lock.
            if await conn.fetchval(_SQL_IS_APPLIED, version):
                continue
            await conn.execute(sql)  # no arguments: simple protocol, several statements
            await conn.execute(_SQL_RECORD_MIGRATION, version)
        applied.append(version)
    return applied


async def _init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Make json/jsonb round-trip as Python objects on every pooled connection."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


class PostgresRecords:
    """RecordStore on Postgres through an asyncpg pool; ``start()`` also migrates."""

    def __init__(
        self, dsn: str, *, min_size: int = 1, max_size: int = 10, command_timeout: float = 10.0
    ) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout = command_timeout
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._secret: bytes | None = None  # never changes once created: read it once
        self._ledger: Batcher[LedgerEntry, LedgerInsert] = Batcher(
            self._flush_spends,
            max_batch=_LEDGER_BATCH,
            max_in_flight=min(_LEDGER_FLUSHES, max_size),
        )

    @property
    def ledger_batcher(self) -> Batcher[LedgerEntry, LedgerInsert]:
        """The group commit behind :meth:`insert_spend` (its counters: tests and metrics)."""
        return self._ledger

    async def start(self) -> None:
        """Apply pending migrations, then open the pool."""
        if self._pool is not None:
            return
        await migrate(self._dsn)
        async with _driver_errors():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                timeout=self._command_timeout,  # connecting, too, must not hang a request
                init=_init_connection,
                reset=keep_session,
            )

    async def close(self) -> None:
        """Close the pool, terminating connections still busy after ``command_timeout``.

        Ledger inserts already queued are flushed first (for up to ``command_timeout``),
        while the pool is still open: callers waiting for their commit get it, rather than
        an outage made by the shutdown itself. Whatever is still running after that fails
        with RecordsUnavailable when the pool closes under it.
        """
        if self._pool is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ledger.drain(), self._command_timeout)
        pool, self._pool = self._pool, None
        if pool is None:  # another close() finished meanwhile
            return
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except TimeoutError:
            pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """A pooled connection, with driver failures reported as Unavailable."""
        async with _driver_errors():
            if self._pool is None:
                raise RecordsUnavailable(
                    "postgres unavailable: the record store is not started or closed"
                )
            # A bounded wait: a saturated pool is reported as unavailable, not queued forever.
            async with self._pool.acquire(timeout=self._command_timeout) as conn:
                yield conn

    async def instance_secret(self) -> bytes:
        """The database's 32-byte secret, created by whichever replica asks first."""
        if self._secret is None:
            async with self._connection() as conn:
                candidate = secrets.token_bytes(32).hex()
                await conn.execute(_SQL_INSERT_SETTING, _SECRET_SETTING, candidate)
                # Re-read rather than trust our candidate: another replica may have won.
                stored = await conn.fetchval(_SQL_GET_SETTING, _SECRET_SETTING)
            self._secret = bytes.fromhex(stored)
        return self._secret

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        """Insert a team; raises AlreadyExists when the team_id is taken."""
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_INSERT_TEAM, *_team_args(team))
            except pg_errors.UniqueViolationError as exc:
                raise AlreadyExists(f"team {team.team_id!r} already exists") from exc
        return _team_from_row(_returned(row))

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """The team, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_TEAM, team_id)
        return None if row is None else _team_from_row(row)

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        """Up to ``limit`` teams ordered by team_id, strictly after ``after_team_id``."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_TEAMS, after_team_id, limit)
        return [_team_from_row(row) for row in rows]

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        """Replace a team's row; raises NotFound when it does not exist."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_UPDATE_TEAM, *_team_args(team))
        if row is None:
            raise NotFound(f"team {team.team_id!r} not found")
        return _team_from_row(row)

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        """Insert a team unless its team_id exists: the stored team, and whether it is new.

        One ``INSERT … ON CONFLICT DO NOTHING``: of concurrent callers on any connections
        exactly one inserts; the others wait for its commit, insert nothing, and read the
        row it committed.
        """
        async with self._connection() as conn:
            for _ in range(3):
                row = await conn.fetchrow(_SQL_INSERT_TEAM_IF_ABSENT, *_team_args(team))
                if row is not None:
                    return _team_from_row(row), True
                row = await conn.fetchrow(_SQL_GET_TEAM, team.team_id)
                if row is not None:
                    return _team_from_row(row), False
                # Deleted between the two statements (teams are not deleted today): again.
        raise RuntimeError(f"team {team.team_id!r} neither inserted nor found")

    async def upsert_member(self, member: MemberRecord) -> MemberRecord:
        """Insert or replace a membership (keeping its created_at); NotFound without the team."""
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_UPSERT_MEMBER, *_member_args(member))
            except pg_errors.ForeignKeyViolationError as exc:
                raise NotFound(f"team {member.team_id!r} not found") from exc
        return _member_from_row(_returned(row))

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        """The membership, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_MEMBER, team_id, user_id)
        return None if row is None else _member_from_row(row)

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        """A team's memberships ordered by user_id (code-point order)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_MEMBERS, team_id)
        return [_member_from_row(row) for row in rows]

    async def delete_member(self, team_id: str, user_id: str) -> bool:
        """Remove a membership; False when there was none."""
        async with self._connection() as conn:
            deleted = await conn.fetchval(_SQL_DELETE_MEMBER, team_id, user_id)
        return bool(deleted)

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        """Insert a key; NotFound when its team does not exist, AlreadyExists on a duplicate."""
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_INSERT_KEY, *_key_args(key))
            except pg_errors.ForeignKeyViolationError as exc:
                raise NotFound(f"team {key.team_id!r} not found") from exc
            except pg_errors.UniqueViolationError as exc:
                if exc.constraint_name == _KEY_HASH_CONSTRAINT:
                    raise AlreadyExists("a key with the same hash already exists") from exc
                raise AlreadyExists(f"key {key.key_id!r} already exists") from exc
        return _key_from_row(_returned(row))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_KEY, key_id)
        return None if row is None else _key_from_row(row)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose plaintext hashes (SHA-256 hex) to ``key_hash``, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_KEY_BY_HASH, key_hash)
        return None if row is None else _key_from_row(row)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replace a key's mutable fields; the stored key (hash, team, revocation kept)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_UPDATE_KEY, *_key_update_args(key))
        if row is None:
            raise NotFound(f"key {key.key_id!r} not found")
        return _key_from_row(row)

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark a key revoked, keeping an earlier revocation time; None if no such key."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_REVOKE_KEY, key_id, _to_timestamp(at))
        return None if row is None else _key_from_row(row)

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        """Insert a ledger row unless its request_id exists; return the stored row.

        Answered after the row's commit. Concurrent calls are group-committed (one
        statement and one commit for the calls that arrive while another flush runs; see
        :meth:`_flush_spends`); a call made while none runs is flushed at once, alone.
        """
        return await self._ledger.submit(entry)

    async def _flush_spends(
        self, entries: list[LedgerEntry]
    ) -> Sequence[LedgerInsert | BaseException]:
        """The ledger batcher's flush: each entry's answer, as one insert_spend would give it.

        A batch of one is inserted the way a lone call always was. A larger batch is one
        statement (:func:`_insert_batch`); if that statement fails for a reason other than
        the connection (a negative cost's CHECK, any other value it rejects, a deadlock),
        the rows are inserted again one at a time, so that only the row at fault gets the
        error. A connection failure reaches every caller as RecordsUnavailable.
        """
        async with self._connection() as conn:
            if len(entries) > 1:
                try:
                    return await _insert_batch(conn, entries)
                except pg_errors.PostgresError as exc:
                    if isinstance(exc, _UNAVAILABLE_ERRORS):
                        raise
                    # The statement failed whole and wrote nothing: retry row by row.
            return await _insert_each(conn, entries)

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        """The ledger row of ``request_id`` and the transaction that wrote it, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_SPEND, request_id)
        return None if row is None else LedgerInsert(False, _ledger_from_row(row), row["xact"])

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
        """Exact sum, in nano-USD, of a scope's ledger costs admitted in ``[start, end)``.

        A non-empty ``user_id`` / ``model`` keeps only that user's / model's rows.
        """
        query, args = _sum_spend_query(kind, scope_id, start, end, user_id, model, as_of=False)
        async with self._connection() as conn:
            total = await conn.fetchval(query, *args)
        return decimal_to_nanos(total)

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
        """:meth:`sum_spend` and the snapshot of the statement that summed (one round trip)."""
        query, args = _sum_spend_query(kind, scope_id, start, end, user_id, model, as_of=True)
        async with self._connection() as conn:
            row = _returned(await conn.fetchrow(query, *args))
        return SpendSum(decimal_to_nanos(row[0]), row[1])

    # -- listings and reports (issue 6) ------------------------------------------------------

    async def list_keys(
        self, team_id: str, after_key_id: str, limit: int, *, include_revoked: bool = False
    ) -> list[KeyRecord]:
        """Up to ``limit`` keys ordered by key_id after ``after_key_id`` ("" team: all)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_KEYS, team_id, after_key_id, include_revoked, limit)
        return [_key_from_row(row) for row in rows]

    async def spend_report(self, query: SpendQuery) -> list[SpendRow]:
        """Exact ledger sums over ``[query.start, query.end)`` per group (see RecordStore)."""
        sql, params = spend_report_sql(
            POSTGRES, query, _to_timestamp(query.start), _to_timestamp(query.end)
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [spend_row(tuple(row), decimal_to_nanos(row["spend"])) for row in rows]


async def _insert_one(
    conn: PoolConnectionProxy[asyncpg.Record], entry: LedgerEntry
) -> LedgerInsert:
    """Insert one ledger row unless its request_id exists; the stored row.

    A new row costs one round trip; a duplicate a second one to read the stored row.
    """
    try:
        row = await conn.fetchrow(_SQL_INSERT_SPEND, *_ledger_args(entry))
    except pg_errors.CheckViolationError as exc:
        raise InvalidArgument(f"cost must not be negative, got {entry.cost_nanos}") from exc
    if row is not None:
        return LedgerInsert(True, _ledger_from_row(row), row["xact"])
    # The ledger is append-only, so the conflicting row is still there.
    existing = _returned(await conn.fetchrow(_SQL_GET_SPEND, entry.request_id))
    return LedgerInsert(False, _ledger_from_row(existing), existing["xact"])


async def _insert_each(
    conn: PoolConnectionProxy[asyncpg.Record], entries: list[LedgerEntry]
) -> list[LedgerInsert | BaseException]:
    """:func:`_insert_one` for each entry in order, each in its own transaction.

    Each row's own error is its answer. If the connection fails, the rows before it keep
    their (committed) answers and the failing row and those after it get RecordsUnavailable,
    as each would have on its own.
    """
    results: list[LedgerInsert | BaseException] = []
    for entry in entries:
        try:
            results.append(await _insert_one(conn, entry))
        except _UNAVAILABLE_ERRORS as exc:
            lost = _unavailable(exc)
            lost.__cause__ = exc
            return results + [lost] * (len(entries) - len(results))
        except Exception as exc:  # this row's answer alone (InvalidArgument for a CHECK)
            results.append(exc)
    return results


async def _insert_batch(
    conn: PoolConnectionProxy[asyncpg.Record], entries: list[LedgerEntry]
) -> list[LedgerInsert]:
    """Insert ``entries`` in one statement (one transaction); each entry's answer.

    A request_id that comes twice in the batch is inserted for its first entry only; the
    later ones are answered with the stored row, as if they had come after it. A row the
    statement did not insert conflicted with a committed row (ON CONFLICT waits for a
    concurrent writer's commit), which a second statement reads, as :func:`_insert_one`.
    """
    firsts: dict[str, LedgerEntry] = {}
    for entry in entries:
        firsts.setdefault(entry.request_id, entry)
    # Every batch writes its rows in request_id order, so two batches that share ids (a
    # retry racing its original, here or on another replica) wait on each other's rows in
    # the same order rather than deadlock. (Should one deadlock anyway, the statement fails
    # whole and _flush_spends retries its rows one at a time.)
    rows = sorted(firsts.values(), key=lambda entry: entry.request_id)
    columns = [list(column) for column in zip(*map(_ledger_args, rows), strict=True)]
    inserted = {row["request_id"]: row for row in await conn.fetch(_SQL_INSERT_SPENDS, *columns)}
    stored = dict(inserted)
    conflicts = [request_id for request_id in firsts if request_id not in inserted]
    if conflicts:  # the ledger is append-only, so the conflicting rows are still there
        stored.update(
            {row["request_id"]: row for row in await conn.fetch(_SQL_GET_SPENDS, conflicts)}
        )
    results: list[LedgerInsert] = []
    answered: set[str] = set()
    for entry in entries:
        row = _returned(stored.get(entry.request_id))
        new = entry.request_id in inserted and entry.request_id not in answered
        answered.add(entry.request_id)
        results.append(LedgerInsert(new, _ledger_from_row(row), row["xact"]))
    return results


def _returned(row: asyncpg.Record | None) -> asyncpg.Record:
    if row is None:  # cannot happen: the row was just inserted, or conflicted with it
        raise RuntimeError("postgres returned no row where one was expected")
    return row


def _to_timestamp(seconds: float) -> datetime:
    """Unix seconds as a timestamptz, floored to Postgres' microsecond resolution.

    Exact (integer arithmetic on the float's ratio) and floored rather than rounded, so an
    instant never crosses a whole-second window boundary on its way into the ledger.
    """
    numerator, denominator = seconds.as_integer_ratio()
    return _EPOCH + timedelta(microseconds=numerator * 1_000_000 // denominator)


def _or_none(convert: Callable[[_In], _Out], value: _In | None) -> _Out | None:
    """``convert(value)``, with NULL (None) passed through."""
    return None if value is None else convert(value)


def _sum_spend_query(
    kind: ScopeKind,
    scope_id: str,
    start: float,
    end: float | None,
    user_id: str,
    model: str,
    *,
    as_of: bool,
) -> tuple[str, list[Any]]:
    """The sum statement of a scope (and filters) and its arguments."""
    scope = "key_id" if kind is ScopeKind.KEY else "team_id"  # TEAM and MEMBER: the team
    query = _SQL_SUM_SPEND[scope, bool(user_id), bool(model), as_of]
    args: list[Any] = [scope_id, _to_timestamp(start), _or_none(_to_timestamp, end)]
    args += [value for value in (user_id, model) if value]
    return query, args


def _team_args(team: TeamRecord) -> tuple[Any, ...]:
    return (
        team.team_id,
        team.team_alias,
        _or_none(nanos_to_decimal, team.max_budget_nanos),
        team.budget_duration,
        team.tpm_limit,
        team.rpm_limit,
        list(team.models),
        team.metadata,
        team.blocked,
        _to_timestamp(team.created_at),
        _or_none(nanos_to_decimal, team.soft_budget_nanos),
        _or_none(nanos_to_decimal, team.member_budget_nanos),
        team.member_budget_duration,
        team.member_rpm_limit,
        team.member_tpm_limit,
        encode_model_budgets(team.model_max_budget),
    )


def _team_from_row(row: asyncpg.Record) -> TeamRecord:
    return TeamRecord(
        team_id=row["team_id"],
        team_alias=row["team_alias"],
        max_budget_nanos=_or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        tpm_limit=row["tpm_limit"],
        rpm_limit=row["rpm_limit"],
        models=tuple(row["models"]),
        metadata=row["metadata"],
        blocked=row["blocked"],
        created_at=row["created_at"].timestamp(),
        soft_budget_nanos=_or_none(decimal_to_nanos, row["soft_budget"]),
        member_budget_nanos=_or_none(decimal_to_nanos, row["member_budget"]),
        member_budget_duration=row["member_budget_duration"],
        member_rpm_limit=row["member_rpm_limit"],
        member_tpm_limit=row["member_tpm_limit"],
        model_max_budget=decode_model_budgets(row["model_max_budget"]),
    )


# Optional text columns hold NULL for the records' "" (absent).
def _key_args(key: KeyRecord) -> tuple[Any, ...]:
    return (
        key.key_id,
        key.key_hash,
        key.key_prefix or None,
        key.team_id,
        key.key_alias or None,
        _or_none(nanos_to_decimal, key.max_budget_nanos),
        key.budget_duration,
        _or_none(_to_timestamp, key.expires_at),
        list(key.models),
        key.user_id or None,
        _or_none(_to_timestamp, key.revoked_at),
        _to_timestamp(key.created_at),
        key.blocked,
        _or_none(nanos_to_decimal, key.soft_budget_nanos),
        key.rpm_limit,
        key.tpm_limit,
        encode_model_budgets(key.model_max_budget),
    )


def _key_update_args(key: KeyRecord) -> tuple[Any, ...]:
    return (
        key.key_id,
        key.key_alias or None,
        _or_none(nanos_to_decimal, key.max_budget_nanos),
        key.budget_duration,
        _or_none(_to_timestamp, key.expires_at),
        list(key.models),
        key.blocked,
        _or_none(nanos_to_decimal, key.soft_budget_nanos),
        key.rpm_limit,
        key.tpm_limit,
        encode_model_budgets(key.model_max_budget),
    )


def _key_from_row(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        key_id=row["key_id"],
        key_hash=row["key_hash"],
        team_id=row["team_id"],
        key_alias=row["key_alias"] or "",
        max_budget_nanos=_or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        key_prefix=row["key_prefix"] or "",
        expires_at=_or_none(datetime.timestamp, row["expires_at"]),
        models=tuple(row["models"] or ()),
        user_id=row["user_id"] or "",
        revoked_at=_or_none(datetime.timestamp, row["revoked_at"]),
        created_at=row["created_at"].timestamp(),
        blocked=row["blocked"],
        soft_budget_nanos=_or_none(decimal_to_nanos, row["soft_budget"]),
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        model_max_budget=decode_model_budgets(row["model_max_budget"]),
    )


def _member_args(member: MemberRecord) -> tuple[Any, ...]:
    return (
        member.team_id,
        member.user_id,
        _or_none(nanos_to_decimal, member.max_budget_nanos),
        member.budget_duration,  # None: the team's member_budget_duration
        member.rpm_limit,
        member.tpm_limit,
        _to_timestamp(member.created_at),
    )


def _member_from_row(row: asyncpg.Record) -> MemberRecord:
    return MemberRecord(
        team_id=row["team_id"],
        user_id=row["user_id"],
        max_budget_nanos=_or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        created_at=row["created_at"].timestamp(),
    )


def _ledger_args(entry: LedgerEntry) -> tuple[Any, ...]:
    return (
        entry.request_id,
        entry.team_id,
        entry.key_id,
        nanos_to_decimal(entry.cost_nanos),
        _to_timestamp(entry.admitted_at),
        _to_timestamp(entry.recorded_at),
        entry.reservation_id or None,
        entry.model or None,
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.metadata or None,  # the ledger is the big table: no '{}' on every row
        entry.user_id,
    )


def _ledger_from_row(row: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(
        request_id=row["request_id"],
        team_id=row["team_id"],
        key_id=row["key_id"],
        cost_nanos=decimal_to_nanos(row["cost"]),
        admitted_at=row["admitted_at"].timestamp(),
        recorded_at=row["recorded_at"].timestamp(),
        reservation_id=row["reservation_id"] or "",
        model=row["model"] or "",
        prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0,
        metadata=row["metadata"] or {},
        user_id=row["user_id"],
    )
