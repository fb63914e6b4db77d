"""Postgres schema migrations: the numbered ``migrations/postgres/NNNN_*.sql`` files.

Applied in order, each in its own transaction under a transaction-level advisory lock, so
that replicas starting together apply each one exactly once.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Final

import asyncpg

from server.storage.postgres_driver import driver_errors

# Any fixed 64-bit number, shared by every budgetd replica: "budgetd" in ASCII.
_MIGRATION_LOCK_ID: Final = int.from_bytes(b"budgetd", "big")
_MIGRATION_FILE: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

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


def load_migrations() -> list[tuple[int, str]]:
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
    migrations = load_migrations()  # outside driver_errors: a missing file is not an outage
    async with driver_errors():
        conn = await asyncpg.connect(dsn)
        try:
            return await apply_migrations(conn, migrations)
        finally:
            await conn.close()


async def apply_migrations(
    conn: asyncpg.Connection[asyncpg.Record], migrations: list[tuple[int, str]]
) -> list[int]:
    """Apply ``migrations`` not yet recorded in the database, in order, each once."""
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
