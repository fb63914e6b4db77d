"""The SQLite file itself: how it is opened, and its numbered ``migrations/sqlite`` files.

Kept apart from the record store's statements: these run when the store opens its file (at
every start, and for ``budgetd migrate``) and from its ``migrate``, on the store's worker
thread, like every other use of the connection.
"""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path


def open_database(path: Path) -> sqlite3.Connection:
    """Open (creating its folder) the SQLite file at ``path``, set up for the record store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level="DEFERRED", check_same_thread=True)
    # WAL + synchronous=FULL: a committed ledger row survives a crash of budgetd.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migration_files() -> list[tuple[int, str]]:
    """The SQLite migrations shipped with budgetd, as (version, sql), in order."""
    folder = resources.files("server.storage") / "migrations" / "sqlite"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.read_text()))
    return sorted(found)


def apply_migrations(conn: sqlite3.Connection) -> list[int]:
    """Apply the migrations not yet recorded in ``conn``'s file, in order; return their versions."""
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
