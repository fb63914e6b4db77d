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
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable
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
    ScopeKind,
    SpendQuery,
    SpendRow,
    SpendSum,
    TeamRecord,
)
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
    " metadata, blocked, created_at"
)
_SQL_INSERT_TEAM: Final = (
    f"INSERT INTO teams ({_TEAM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    f" RETURNING {_TEAM_COLUMNS}"
)
_SQL_GET_TEAM: Final = f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id = $1"
_SQL_LIST_TEAMS: Final = (
    f"SELECT {_TEAM_COLUMNS} FROM teams WHERE team_id > $1 ORDER BY team_id LIMIT $2"
)
_SQL_UPDATE_TEAM: Final = f"""
UPDATE teams SET team_alias = $2, max_budget = $3, budget_duration = $4, tpm_limit = $5,
    rpm_limit = $6, models = $7, metadata = $8, blocked = $9, created_at = $10
WHERE team_id = $1
RETURNING {_TEAM_COLUMNS}"""

# --- Keys ------------------------------------------------------------------------------
_KEY_COLUMNS: Final = (
    "key_id, key_hash, key_prefix, team_id, key_alias, max_budget, budget_duration,"
    " expires_at, models, user_id, revoked_at, created_at"
)
_SQL_INSERT_KEY: Final = (
    f"INSERT INTO api_keys ({_KEY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    f" RETURNING {_KEY_COLUMNS}"
)
_SQL_GET_KEY: Final = f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = $1"
_SQL_GET_KEY_BY_HASH: Final = f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
_SQL_REVOKE_KEY: Final = (
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE key_id = $1"
    f" RETURNING {_KEY_COLUMNS}"
)

# --- Spend ledger ----------------------------------------------------------------------
_LEDGER_COLUMNS: Final = (
    "request_id, team_id, key_id, cost, admitted_at, recorded_at, reservation_id, model,"
    " prompt_tokens, completion_tokens, metadata"
)
# xact (migration 0002) is filled by its column default: the writing transaction's id.
_SQL_INSERT_SPEND: Final = (
    f"INSERT INTO spend_ledger ({_LEDGER_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    f" ON CONFLICT (request_id) DO NOTHING RETURNING {_LEDGER_COLUMNS}, xact"
)
_SQL_GET_SPEND: Final = f"SELECT {_LEDGER_COLUMNS}, xact FROM spend_ledger WHERE request_id = $1"
# One query per scope kind so each is served by its (scope, admitted_at) index; a NULL end
# means no upper bound.
_SUM_SPEND: Final = """SELECT COALESCE(SUM(cost), 0) FROM spend_ledger WHERE {scope} = $1
    AND admitted_at >= $2 AND admitted_at < COALESCE($3::timestamptz, 'infinity')"""
_SQL_SUM_TEAM_SPEND: Final = _SUM_SPEND.format(scope="team_id")
_SQL_SUM_KEY_SPEND: Final = _SUM_SPEND.format(scope="key_id")
# The same sums with the snapshot of the statement that read them (a rebuilt counter keeps it).
_SUM_SPEND_AS_OF: Final = _SUM_SPEND.replace(
    "SELECT COALESCE(SUM(cost), 0)", "SELECT COALESCE(SUM(cost), 0), pg_current_snapshot()::text"
)
_SQL_SUM_TEAM_SPEND_AS_OF: Final = _SUM_SPEND_AS_OF.format(scope="team_id")
_SQL_SUM_KEY_SPEND_AS_OF: Final = _SUM_SPEND_AS_OF.format(scope="key_id")

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
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise error(f"postgres unavailable: {detail}") from exc


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
            )

    async def close(self) -> None:
        """Close the pool, terminating connections still busy after ``command_timeout``."""
        pool, self._pool = self._pool, None
        if pool is None:
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

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark a key revoked, keeping an earlier revocation time; None if no such key."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_REVOKE_KEY, key_id, _to_timestamp(at))
        return None if row is None else _key_from_row(row)

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        """Insert a ledger row unless its request_id exists; return the stored row.

        A new row costs one round trip; a duplicate a second one to read the stored row.
        """
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_INSERT_SPEND, *_ledger_args(entry))
            except pg_errors.CheckViolationError as exc:
                raise InvalidArgument(f"cost must not be negative, got {entry.cost_nanos}") from exc
            if row is not None:
                return LedgerInsert(True, _ledger_from_row(row), row["xact"])
            # The ledger is append-only, so the conflicting row is still there.
            existing = _returned(await conn.fetchrow(_SQL_GET_SPEND, entry.request_id))
        return LedgerInsert(False, _ledger_from_row(existing), existing["xact"])

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        """The ledger row of ``request_id`` and the transaction that wrote it, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_SPEND, request_id)
        return None if row is None else LedgerInsert(False, _ledger_from_row(row), row["xact"])

    async def sum_spend(
        self, kind: ScopeKind, scope_id: str, start: float, end: float | None
    ) -> int:
        """Exact sum, in nano-USD, of a scope's ledger costs admitted in ``[start, end)``."""
        query = _SQL_SUM_TEAM_SPEND if kind is ScopeKind.TEAM else _SQL_SUM_KEY_SPEND
        bounds = (_to_timestamp(start), _or_none(_to_timestamp, end))
        async with self._connection() as conn:
            total = await conn.fetchval(query, scope_id, *bounds)
        return decimal_to_nanos(total)

    async def sum_spend_as_of(
        self, kind: ScopeKind, scope_id: str, start: float, end: float | None
    ) -> SpendSum:
        """:meth:`sum_spend` and the snapshot of the statement that summed (one round trip)."""
        query = _SQL_SUM_TEAM_SPEND_AS_OF if kind is ScopeKind.TEAM else _SQL_SUM_KEY_SPEND_AS_OF
        bounds = (_to_timestamp(start), _or_none(_to_timestamp, end))
        async with self._connection() as conn:
            row = _returned(await conn.fetchrow(query, scope_id, *bounds))
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
    )
