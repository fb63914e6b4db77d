"""The Postgres record store (asyncpg): teams, hashed keys and the append-only spend ledger.

Every method reaches Postgres through one context manager that turns connection-level
failures into :class:`~server.errors.Unavailable`
(:func:`~server.storage.postgres_driver.driver_errors`), so a database outage reaches callers
as UNAVAILABLE and is never mistaken for a denial or a bug. The statements of teams, keys,
members and settings are here; the rows' conversions are in
:mod:`server.storage.postgres_rows`, the ledger's statements (with its group commit) in
:mod:`server.storage.postgres_ledger`, and the schema in
:mod:`server.storage.postgres_migrations`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Final

import asyncpg
from asyncpg import exceptions as pg_errors
from asyncpg.pool import PoolConnectionProxy

from server.errors import AlreadyExists, NotFound, RecordsUnavailable
from server.money import decimal_to_nanos
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
from server.storage.batching import BatchCounts, Batcher
from server.storage.postgres_driver import (
    UNAVAILABLE_ERRORS,
    driver_errors,
    init_connection,
    keep_session,
    to_timestamp,
)
from server.storage.postgres_ledger import (
    SQL_GET_SPEND,
    insert_batch,
    insert_each,
    sum_spend_query,
)
from server.storage.postgres_migrations import migrate
from server.storage.postgres_rows import (
    KEY_COLUMNS,
    MEMBER_COLUMNS,
    TEAM_COLUMNS,
    TEAM_VALUES,
    key_args,
    key_from_row,
    key_update_args,
    ledger_from_row,
    member_args,
    member_from_row,
    returned,
    team_args,
    team_from_row,
)
from server.storage.spend_sql import POSTGRES, spend_report_sql, spend_row

_SECRET_SETTING: Final = "instance_secret"
_KEY_HASH_CONSTRAINT: Final = "api_keys_key_hash_key"

# --- Settings --------------------------------------------------------------------------
_SQL_INSERT_SETTING: Final = (
    "INSERT INTO budgetd_settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
)
_SQL_GET_SETTING: Final = "SELECT value FROM budgetd_settings WHERE name = $1"

# --- Teams -----------------------------------------------------------------------------
_SQL_INSERT_TEAM: Final = (
    f"INSERT INTO teams ({TEAM_COLUMNS}) VALUES ({TEAM_VALUES}) RETURNING {TEAM_COLUMNS}"
)
# The JWT upsert: nothing is written (and nothing returned) when the team exists already.
_SQL_INSERT_TEAM_IF_ABSENT: Final = (
    f"INSERT INTO teams ({TEAM_COLUMNS}) VALUES ({TEAM_VALUES})"
    f" ON CONFLICT (team_id) DO NOTHING RETURNING {TEAM_COLUMNS}"
)
_SQL_GET_TEAM: Final = f"SELECT {TEAM_COLUMNS} FROM teams WHERE team_id = $1"
_SQL_LIST_TEAMS: Final = (
    f"SELECT {TEAM_COLUMNS} FROM teams WHERE team_id > $1 ORDER BY team_id LIMIT $2"
)
_SQL_UPDATE_TEAM: Final = f"""
UPDATE teams SET team_alias = $2, max_budget = $3, budget_duration = $4, tpm_limit = $5,
    rpm_limit = $6, models = $7, metadata = $8, blocked = $9, created_at = $10,
    soft_budget = $11, member_budget = $12, member_budget_duration = $13,
    member_rpm_limit = $14, member_tpm_limit = $15, model_max_budget = $16
WHERE team_id = $1
RETURNING {TEAM_COLUMNS}"""

# --- Keys ------------------------------------------------------------------------------
_SQL_INSERT_KEY: Final = (
    f"INSERT INTO api_keys ({KEY_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
    f" RETURNING {KEY_COLUMNS}"
)
# The mutable fields only: hash, prefix, team, user, revocation and creation are kept.
_SQL_UPDATE_KEY: Final = f"""
UPDATE api_keys SET key_alias = $2, max_budget = $3, budget_duration = $4, expires_at = $5,
    models = $6, blocked = $7, soft_budget = $8, rpm_limit = $9, tpm_limit = $10,
    model_max_budget = $11
WHERE key_id = $1
RETURNING {KEY_COLUMNS}"""
_SQL_GET_KEY: Final = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_id = $1"
_SQL_GET_KEY_BY_HASH: Final = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE key_hash = $1"
_SQL_REVOKE_KEY: Final = (
    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE key_id = $1"
    f" RETURNING {KEY_COLUMNS}"
)

# --- Team members ----------------------------------------------------------------------
# A replaced membership keeps the instant it was first created.
_SQL_UPSERT_MEMBER: Final = f"""
INSERT INTO team_members ({MEMBER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (team_id, user_id) DO UPDATE SET max_budget = EXCLUDED.max_budget,
    budget_duration = EXCLUDED.budget_duration, rpm_limit = EXCLUDED.rpm_limit,
    tpm_limit = EXCLUDED.tpm_limit
RETURNING {MEMBER_COLUMNS}"""
_SQL_GET_MEMBER: Final = (
    f"SELECT {MEMBER_COLUMNS} FROM team_members WHERE team_id = $1 AND user_id = $2"
)
_SQL_LIST_MEMBERS: Final = (
    f"SELECT {MEMBER_COLUMNS} FROM team_members WHERE team_id = $1 ORDER BY user_id"
)
_SQL_DELETE_MEMBER: Final = (
    "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2 RETURNING true"
)

# Rows per statement, and statements at once (each holds a pooled connection while it runs;
# two keep one committing while the next batch forms, and leave the pool to everyone else).
_LEDGER_BATCH: Final = 256
_LEDGER_FLUSHES: Final = 2


# --- Listings (issue 6) ----------------------------------------------------------------
_SQL_LIST_KEYS: Final = (
    f"SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1 = '' OR team_id = $1) AND key_id > $2"
    " AND ($3 OR revoked_at IS NULL) ORDER BY key_id LIMIT $4"
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
        # The connections the ledger's group commits keep between flushes (see
        # _ledger_take): at most one per flush in flight, and only while that leaves
        # the pool a connection for everything else.
        self._kept: list[PoolConnectionProxy[asyncpg.Record]] = []
        self._keep = _LEDGER_FLUSHES if max_size > _LEDGER_FLUSHES else 0

    @property
    def ledger_batcher(self) -> Batcher[LedgerEntry, LedgerInsert]:
        """The group commit behind :meth:`insert_spend` (its counters: tests and metrics)."""
        return self._ledger

    def batch_counts(self) -> BatchCounts:
        """The ledger's group commits (:class:`server.storage.batching.Batching`)."""
        return self._ledger.counts()

    async def start(self) -> None:
        """Apply pending migrations, then open the pool."""
        if self._pool is not None:
            return
        await migrate(self._dsn)
        async with driver_errors():
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout,
                timeout=self._command_timeout,  # connecting, too, must not hang a request
                init=init_connection,
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
        kept, self._kept = self._kept, []
        for conn in kept:  # the pool's close waits for every connection to come back
            with contextlib.suppress(Exception):
                await pool.release(conn)
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except TimeoutError:
            pool.terminate()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
        """A pooled connection, with driver failures reported as Unavailable."""
        async with driver_errors():
            pool = self._open_pool()
            conn = await self._checkout(pool)
            try:
                yield conn
            finally:
                await pool.release(conn)

    def _open_pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise RecordsUnavailable(
                "postgres unavailable: the record store is not started or closed"
            )
        return self._pool

    async def _checkout(
        self, pool: asyncpg.Pool[asyncpg.Record]
    ) -> PoolConnectionProxy[asyncpg.Record]:
        # A bounded wait: a saturated pool is reported as unavailable, not queued forever.
        # (asyncio.timeout rather than acquire's own timeout, which wraps every acquire in a
        # task of its own; queries still time out by the pool's command_timeout.)
        async with asyncio.timeout(self._command_timeout):
            return await pool.acquire()

    async def _ledger_take(
        self, pool: asyncpg.Pool[asyncpg.Record]
    ) -> PoolConnectionProxy[asyncpg.Record]:
        """A connection for one group commit: one the ledger kept, or a checkout.

        asyncpg's checkout and return of a pooled connection cost budgetd about as much CPU
        as a group commit's own statement, and a RecordSpend little else in Postgres: the
        ledger keeps the connections its flushes used (RecordSpend +3 % and +13 % in two
        runs of 12 interleaved rounds). A kept connection found closed (Postgres restarted,
        or ended an idle session) is not used, as the pool would not hand it out: asyncpg
        has given it back to the pool already, which replaces it.
        """
        while self._kept:
            conn = self._kept.pop()
            try:
                if not conn.is_closed():
                    return conn
            except pg_errors.InterfaceError:  # detached: asyncpg returned it when it closed
                continue
            await pool.release(conn)
        return await self._checkout(pool)

    async def _ledger_give_back(
        self, pool: asyncpg.Pool[asyncpg.Record], conn: PoolConnectionProxy[asyncpg.Record], *,
        healthy: bool,
    ) -> None:  # fmt: skip
        """Keep ``conn`` for the next group commit, or return it to ``pool``: after a
        connection failure (the pool resets or replaces it), when enough are kept, and once
        close() has begun (it returns the kept ones)."""
        if healthy and self._pool is pool and len(self._kept) < self._keep:
            self._kept.append(conn)
        else:
            await pool.release(conn)

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
                row = await conn.fetchrow(_SQL_INSERT_TEAM, *team_args(team))
            except pg_errors.UniqueViolationError as exc:
                raise AlreadyExists(f"team {team.team_id!r} already exists") from exc
        return team_from_row(returned(row))

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """The team, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_TEAM, team_id)
        return None if row is None else team_from_row(row)

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        """Up to ``limit`` teams ordered by team_id, strictly after ``after_team_id``."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_TEAMS, after_team_id, limit)
        return [team_from_row(row) for row in rows]

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        """Replace a team's row; raises NotFound when it does not exist."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_UPDATE_TEAM, *team_args(team))
        if row is None:
            raise NotFound(f"team {team.team_id!r} not found")
        return team_from_row(row)

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        """Insert a team unless its team_id exists: the stored team, and whether it is new.

        One ``INSERT … ON CONFLICT DO NOTHING``: of concurrent callers on any connections
        exactly one inserts; the others wait for its commit, insert nothing, and read the
        row it committed.
        """
        async with self._connection() as conn:
            for _ in range(3):
                row = await conn.fetchrow(_SQL_INSERT_TEAM_IF_ABSENT, *team_args(team))
                if row is not None:
                    return team_from_row(row), True
                row = await conn.fetchrow(_SQL_GET_TEAM, team.team_id)
                if row is not None:
                    return team_from_row(row), False
                # Deleted between the two statements (teams are not deleted today): again.
        raise RuntimeError(f"team {team.team_id!r} neither inserted nor found")

    async def upsert_member(self, member: MemberRecord) -> MemberRecord:
        """Insert or replace a membership (keeping its created_at); NotFound without the team."""
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_UPSERT_MEMBER, *member_args(member))
            except pg_errors.ForeignKeyViolationError as exc:
                raise NotFound(f"team {member.team_id!r} not found") from exc
        return member_from_row(returned(row))

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        """The membership, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_MEMBER, team_id, user_id)
        return None if row is None else member_from_row(row)

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        """A team's memberships ordered by user_id (code-point order)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_MEMBERS, team_id)
        return [member_from_row(row) for row in rows]

    async def delete_member(self, team_id: str, user_id: str) -> bool:
        """Remove a membership; False when there was none."""
        async with self._connection() as conn:
            deleted = await conn.fetchval(_SQL_DELETE_MEMBER, team_id, user_id)
        return bool(deleted)

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        """Insert a key; NotFound when its team does not exist, AlreadyExists on a duplicate."""
        async with self._connection() as conn:
            try:
                row = await conn.fetchrow(_SQL_INSERT_KEY, *key_args(key))
            except pg_errors.ForeignKeyViolationError as exc:
                raise NotFound(f"team {key.team_id!r} not found") from exc
            except pg_errors.UniqueViolationError as exc:
                if exc.constraint_name == _KEY_HASH_CONSTRAINT:
                    raise AlreadyExists("a key with the same hash already exists") from exc
                raise AlreadyExists(f"key {key.key_id!r} already exists") from exc
        return key_from_row(returned(row))

    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_KEY, key_id)
        return None if row is None else key_from_row(row)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key whose plaintext hashes (SHA-256 hex) to ``key_hash``, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_GET_KEY_BY_HASH, key_hash)
        return None if row is None else key_from_row(row)

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replace a key's mutable fields; the stored key (hash, team, revocation kept)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_UPDATE_KEY, *key_update_args(key))
        if row is None:
            raise NotFound(f"key {key.key_id!r} not found")
        return key_from_row(row)

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark a key revoked, keeping an earlier revocation time; None if no such key."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_SQL_REVOKE_KEY, key_id, to_timestamp(at))
        return None if row is None else key_from_row(row)

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
        statement (:func:`insert_batch`); if that statement fails for a reason other than
        the connection (a negative cost's CHECK, any other value it rejects, a deadlock),
        the rows are inserted again one at a time, so that only the row at fault gets the
        error. A connection failure reaches every caller as RecordsUnavailable.
        """
        async with driver_errors():
            pool = self._open_pool()
            conn = await self._ledger_take(pool)
            results: Sequence[LedgerInsert | BaseException] = ()
            try:
                if len(entries) > 1:
                    try:
                        results = await insert_batch(conn, entries)
                    except pg_errors.PostgresError as exc:
                        if isinstance(exc, UNAVAILABLE_ERRORS):
                            raise
                        # The statement failed whole and wrote nothing: retry row by row.
                if not results:
                    results = await insert_each(conn, entries)
            finally:
                # (insert_each answers a lost connection as RecordsUnavailable results)
                healthy = bool(results) and not any(
                    isinstance(result, RecordsUnavailable) for result in results
                )
                await self._ledger_give_back(pool, conn, healthy=healthy)
            return results

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        """The ledger row of ``request_id`` and the transaction that wrote it, or None."""
        async with self._connection() as conn:
            row = await conn.fetchrow(SQL_GET_SPEND, request_id)
        return None if row is None else LedgerInsert(False, ledger_from_row(row), row["xact"])

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
        query, args = sum_spend_query(kind, scope_id, start, end, user_id, model, as_of=False)
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
        query, args = sum_spend_query(kind, scope_id, start, end, user_id, model, as_of=True)
        async with self._connection() as conn:
            row = returned(await conn.fetchrow(query, *args))
        return SpendSum(decimal_to_nanos(row[0]), row[1])

    # -- listings and reports (issue 6) ------------------------------------------------------

    async def list_keys(
        self, team_id: str, after_key_id: str, limit: int, *, include_revoked: bool = False
    ) -> list[KeyRecord]:
        """Up to ``limit`` keys ordered by key_id after ``after_key_id`` ("" team: all)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_SQL_LIST_KEYS, team_id, after_key_id, include_revoked, limit)
        return [key_from_row(row) for row in rows]

    async def spend_report(self, query: SpendQuery) -> list[SpendRow]:
        """Exact ledger sums over ``[query.start, query.end)`` per group (see RecordStore)."""
        sql, params = spend_report_sql(
            POSTGRES, query, to_timestamp(query.start), to_timestamp(query.end)
        )
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *params)
        return [spend_row(tuple(row), decimal_to_nanos(row["spend"])) for row in rows]
