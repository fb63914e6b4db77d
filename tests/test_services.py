"""The test harness itself: throwaway Postgres and Redis start, isolate tests and restart."""

from __future__ import annotations

import asyncpg
import pytest
import redis.asyncio as aioredis

from services import PostgresServer, RedisServer, random_database_name


async def test_postgres_accepts_connections(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert (await conn.fetchval("SELECT current_database()")).startswith("budgetd_test_")
    finally:
        await conn.close()


async def test_each_test_database_is_distinct(pg_server: PostgresServer, database_url: str) -> None:
    name = random_database_name()
    second_url = await pg_server.create_database(name)
    try:
        assert second_url != database_url
        first = await asyncpg.connect(database_url)
        second = await asyncpg.connect(second_url)
        try:
            await first.execute("CREATE TABLE only_here (x int)")
            assert await first.fetchval("SELECT current_database()") != await second.fetchval(
                "SELECT current_database()"
            )
            assert await second.fetchval("SELECT to_regclass('only_here')") is None
        finally:
            await first.close()
            await second.close()
    finally:
        await pg_server.drop_database(name)
    admin = await asyncpg.connect(pg_server.url)
    try:
        assert (
            await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0
        )
    finally:
        await admin.close()


async def test_redis_answers_ping_and_starts_empty(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.ping()
        assert await client.dbsize() == 0
        await client.set("budgetd-test-key", "1")
    finally:
        await client.aclose()


async def test_redis_restart_keeps_url_and_works(redis_server: RedisServer, redis_url: str) -> None:
    if not redis_server.managed:
        pytest.skip("BUDGETD_TEST_REDIS_URL names an external Redis: it cannot be restarted")
    before = aioredis.Redis.from_url(redis_url)
    try:
        await before.set("before", "1")
    finally:
        await before.aclose()
    await redis_server.restart()
    assert redis_server.url == redis_url
    # A new client: a pooled connection from before the restart fails its next command.
    after = aioredis.Redis.from_url(redis_url)
    try:
        assert await after.ping()
        assert await after.get("before") is None  # a restart loses every key
        await after.set("after", "2")
        assert await after.get("after") == b"2"
    finally:
        await after.aclose()


async def test_second_redis_server_is_independent(redis_url: str) -> None:
    async with RedisServer() as second:
        assert second.url != redis_url
        first_client = aioredis.Redis.from_url(redis_url)
        second_client = aioredis.Redis.from_url(second.url)
        try:
            await second_client.set("only-here", "1")
            assert await first_client.get("only-here") is None
        finally:
            await first_client.aclose()
            await second_client.aclose()
    assert not second.running


async def test_postgres_restart_keeps_data(pg_server: PostgresServer, database_url: str) -> None:
    if not pg_server.managed:
        pytest.skip("BUDGETD_TEST_DATABASE_URL names an external Postgres: it cannot be restarted")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TABLE survives (x int); INSERT INTO survives VALUES (7)")
    finally:
        await conn.close()
    url_before = pg_server.url
    await pg_server.restart()
    assert pg_server.url == url_before
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT x FROM survives") == 7
    finally:
        await conn.close()
