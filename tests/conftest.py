"""Shared fixtures: throwaway PostgreSQL and Redis servers (see tests/services.py).

Servers start lazily, once per session, the first time a test asks for them; tests that need
neither never start anything.

Environment:
- ``BUDGETD_TEST_DATABASE_URL``: use this existing Postgres server instead of starting one. The
  URL must name a role that may create databases; each test still gets its own fresh database.
- ``BUDGETD_TEST_REDIS_URL``: use this existing Redis instead of starting one. **The logical DB
  named in the URL is wiped (FLUSHDB) before every test that uses it**; other DBs are left alone.
  Point it at a DB index nothing else uses (e.g. ``redis://127.0.0.1:6379/14``).

Fault tests that stop or restart a server should ``pytest.skip`` when its ``managed`` is false.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from services import (
    PostgresServer,
    RedisClusterServers,
    RedisServer,
    flush_redis,
    random_database_name,
)

DATABASE_URL_ENV = "BUDGETD_TEST_DATABASE_URL"
REDIS_URL_ENV = "BUDGETD_TEST_REDIS_URL"


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[PostgresServer]:
    """The session's Postgres server: a throwaway cluster, or BUDGETD_TEST_DATABASE_URL's."""
    external = os.environ.get(DATABASE_URL_ENV)
    if external:
        yield PostgresServer.external(external)
        return
    async with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
async def redis_server() -> AsyncIterator[RedisServer]:
    """The session's Redis server: a throwaway redis-server, or BUDGETD_TEST_REDIS_URL's."""
    external = os.environ.get(REDIS_URL_ENV)
    if external:
        yield RedisServer.external(external)
        return
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def database_url(pg_server: PostgresServer) -> AsyncIterator[str]:
    """URL of a fresh, empty database (``budgetd_test_<random>``), dropped after the test."""
    name = random_database_name()
    url = await pg_server.create_database(name)
    try:
        yield url
    finally:
        await pg_server.drop_database(name)


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis DB: our server is FLUSHALLed, an external one's DB is FLUSHDBed."""
    if redis_server.managed and not redis_server.running:
        await redis_server.start()  # a previous test stopped it and failed before restarting
    await flush_redis(redis_server.url, everything=redis_server.managed)
    return redis_server.url


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, for fault tests that flush, stop or restart it.

    Never the session's shared server, whose loss would break other tests; skipped with
    ``BUDGETD_TEST_REDIS_URL`` (the machine may have no redis-server to start).
    """
    if os.environ.get(REDIS_URL_ENV):
        pytest.skip(f"{REDIS_URL_ENV} is set: the fault tests start and stop their own Redis")
    async with RedisServer() as server:
        yield server


@pytest.fixture
async def own_postgres() -> AsyncIterator[PostgresServer]:
    """A Postgres cluster of the test's own, for fault tests that stop and start it."""
    if os.environ.get(DATABASE_URL_ENV):
        pytest.skip(f"{DATABASE_URL_ENV} is set: the fault tests start and stop their own Postgres")
    async with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
async def redis_cluster() -> AsyncIterator[RedisClusterServers]:
    """A throwaway 3-master Redis Cluster for the session (always started by the tests)."""
    async with RedisClusterServers() as cluster:
        yield cluster


@pytest.fixture
async def redis_cluster_url(redis_cluster: RedisClusterServers) -> str:
    """``redis+cluster://`` URL of the session's cluster, every master flushed first."""
    await redis_cluster.flush()
    return redis_cluster.url
