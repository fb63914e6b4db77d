"""A large population of teams and keys, written straight into budgetd's Postgres tables.

The memory target is stated for 100,000 teams and 1,000,000 keys. Creating them through the
admin API would take far longer than the bench, so they are written with ``COPY`` into the
tables of ``server/storage/migrations/postgres`` (only the columns without a usable default
are given). Key ``i`` belongs to team ``i % teams``. The first ``driven`` keys get real
plaintexts, hashed as budgetd hashes them, so a client can send them; the rest are random
SHA-256 digests that no plaintext matches. Teams have a large 30-day budget, so every check
is an allow that places a hold. Nothing is cached between runs: each run fills a fresh
database.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from server.identity import generate_api_key, hash_api_key, key_display_prefix

CHUNK = 100_000
TEAM_BUDGET = Decimal("1000000")
TEAM_BUDGET_DURATION = "30d"


@dataclass
class Dataset:
    """What was loaded, and the plaintexts of the keys a client may drive."""

    teams: int
    keys: int
    plaintexts: list[str]
    seconds: float


def _team_rows(team_ids: list[str], now: datetime) -> Iterator[tuple[object, ...]]:
    for index, team_id in enumerate(team_ids):
        yield (team_id, f"bench team {index}", TEAM_BUDGET, TEAM_BUDGET_DURATION, now)


def _key_rows(
    start: int, stop: int, team_ids: list[str], plaintexts: list[str], now: datetime
) -> Iterator[tuple[object, ...]]:
    for index in range(start, stop):
        if index < len(plaintexts):
            key = plaintexts[index]
            digest, prefix = hash_api_key(key), key_display_prefix(key)
        else:
            digest, prefix = secrets.token_hex(32), "sk-xxxx…"
        yield (f"key_bench{index:09d}", digest, prefix, team_ids[index % len(team_ids)], now)


async def load_dataset(database_url: str, *, teams: int, keys: int, driven: int) -> Dataset:
    """Insert ``teams`` teams and ``keys`` keys (COPY, one transaction); return the
    plaintexts of the first ``driven`` keys."""
    began = time.perf_counter()
    now = datetime.now(UTC)
    team_ids = [str(uuid.uuid4()) for _ in range(teams)]
    plaintexts = [generate_api_key() for _ in range(min(driven, keys))]
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            # The rows are consistent by construction (every key's team is inserted first), so
            # the per-row foreign-key triggers are skipped for this transaction (superuser).
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.copy_records_to_table(
                "teams",
                records=_team_rows(team_ids, now),
                columns=["team_id", "team_alias", "max_budget", "budget_duration", "created_at"],
            )
            for start in range(0, keys, CHUNK):
                await conn.copy_records_to_table(
                    "api_keys",
                    records=_key_rows(start, min(keys, start + CHUNK), team_ids, plaintexts, now),
                    columns=["key_id", "key_hash", "key_prefix", "team_id", "created_at"],
                )
        await conn.execute("ANALYZE teams; ANALYZE api_keys")
    finally:
        await conn.close()
    return Dataset(teams, keys, plaintexts, time.perf_counter() - began)
