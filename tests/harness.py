"""budgetd test helpers: settings, both storage backends, an in-process gRPC server."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from server.admin import Admin
from server.app import BudgetdServer, Stores
from server.authority import Authority
from server.clock import Clock, FakeClock
from server.config import Settings, load_settings
from server.gen.budgetd.v1 import budgetd_pb2_grpc
from server.identity import ReservationCodec
from server.rules import Enforcement
from server.storage.base import CounterStore, RecordStore
from server.storage.memory_counters import MemoryCounters
from server.storage.postgres import PostgresRecords
from server.storage.postgres_counters import PostgresCounters
from server.storage.redis_counters import RedisCounters
from server.storage.sqlite import SqliteRecords

MASTER_KEY = "sk-1234"
ADMIN = (("authorization", f"Bearer {MASTER_KEY}"),)
# 2024-06-13T22:48:36Z, the instant in the seed's example response.
SEED_INSTANT = 1718318916.0
BACKENDS = ("embedded", "postgres_redis")
# The contract suite also runs on a 3-master Redis Cluster (same Lua scripts), and on
# Postgres alone: the counters budgetd falls back to while Redis is down (redis_down: postgres).
CONTRACT_BACKENDS = (*BACKENDS, "postgres_redis_cluster", "postgres_only")


def backend_urls(request: pytest.FixtureRequest, name: str) -> dict[str, str]:
    """The service URLs backend ``name`` needs (from a sync fixture: it may start them)."""
    if name == "embedded":
        return {}
    if name == "postgres_only":
        return {"database_url": request.getfixturevalue("database_url")}
    redis_fixture = "redis_cluster_url" if name.endswith("cluster") else "redis_url"
    return {
        "database_url": request.getfixturevalue("database_url"),
        "redis_url": request.getfixturevalue(redis_fixture),
    }


def make_settings(
    tmp_path: Path,
    *,
    database_url: str | None = None,
    redis_url: str | None = None,
    master_key: str | None = MASTER_KEY,
    **changes: Any,
) -> Settings:
    """Settings as budgetd would load them from this environment, then ``changes`` applied."""
    env = {"BUDGETD_DATA_DIR": str(tmp_path / "data")}
    if database_url:
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    if master_key:
        env["BUDGETD_MASTER_KEY"] = master_key
    settings = load_settings(None, env, {"grpc_addr": "127.0.0.1:0", "metrics_addr": "127.0.0.1:0"})
    return dataclasses.replace(settings, **changes) if changes else settings


def make_stores(name: str, settings: Settings) -> Stores:
    """The stores of backend ``name`` (one of CONTRACT_BACKENDS)."""
    if name == "embedded":
        return Stores(SqliteRecords(settings.data_dir / "budgetd.sqlite3"), MemoryCounters(), name)
    if name == "postgres_only":
        assert settings.database_url
        exact = PostgresCounters(settings.database_url)
        return Stores(PostgresRecords(settings.database_url), exact, name)
    assert settings.database_url and settings.redis_url
    counters = RedisCounters(settings.redis_url)  # a redis+cluster:// URL means Cluster
    return Stores(PostgresRecords(settings.database_url), counters, name)


@dataclasses.dataclass
class Backend:
    """One storage backend with the decision and admin logic on a fake clock."""

    name: str
    settings: Settings
    records: RecordStore
    counters: CounterStore
    clock: FakeClock
    authority: Authority
    admin: Admin

    async def lose_counters(self) -> None:
        """Forget every hot counter (a restart of the embedded store, FLUSHALL in Redis).

        Counters on Postgres alone are the ledger's sums: there is nothing to lose.
        """
        if isinstance(self.counters, PostgresCounters):
            return
        if isinstance(self.counters, RedisCounters):
            url = self.settings.redis_url
            assert url
            if url.startswith("redis+cluster://"):
                cluster = aioredis.RedisCluster.from_url(url.replace("redis+cluster", "redis"))
                await cluster.flushall(target_nodes=aioredis.RedisCluster.PRIMARIES)
                await cluster.aclose()
            else:
                client = aioredis.Redis.from_url(url)
                await client.flushdb()
                await client.aclose()
        else:
            await self.counters.close()
            self.counters = MemoryCounters()
            await self.counters.start()
            self.authority = _authority(self, await self.records.instance_secret())
            self.admin = Admin(self.records, self.counters, self.clock, tz=UTC)


def _authority(backend: Backend, secret: bytes) -> Authority:
    return Authority(
        backend.records,
        backend.counters,
        backend.clock,
        ReservationCodec(secret),
        enforcement=backend.settings.enforcement,
        reservation_ttl=backend.settings.reservation_ttl,
        tz=UTC,
        prices=backend.settings.prices,
    )


@asynccontextmanager
async def open_backend(name: str, settings: Settings) -> AsyncIterator[Backend]:
    """Start backend ``name`` with a FakeClock at the seed's instant; close it afterwards."""
    stores = make_stores(name, settings)
    await stores.records.start()
    await stores.counters.start()
    clock = FakeClock(SEED_INSTANT)
    backend = Backend(
        name,
        settings,
        stores.records,
        stores.counters,
        clock,
        authority=None,  # type: ignore[arg-type]
        admin=Admin(stores.records, stores.counters, clock, tz=UTC),
    )
    backend.authority = _authority(backend, await stores.records.instance_secret())
    try:
        yield backend
    finally:
        await backend.counters.close()
        await backend.records.close()


@dataclasses.dataclass
class Running:
    """An in-process budgetd gRPC server and a stub connected to it."""

    server: BudgetdServer
    channel: grpc.aio.Channel
    stub: budgetd_pb2_grpc.BudgetAuthorityAsyncStub

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(
    name: str, settings: Settings, clock: Clock | None = None
) -> AsyncIterator[Running]:
    """Serve budgetd on a free port with backend ``name``; stop it afterwards."""
    server = BudgetdServer(settings, clock=clock, stores=make_stores(name, settings))
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        # The async stub type exists only in the .pyi: the plain stub is async on an aio channel.
        yield Running(server, channel, budgetd_pb2_grpc.BudgetAuthorityStub(channel))
    finally:
        await channel.close()
        await server.stop(grace=1.0)


def nanos(usd: float) -> int:
    """USD to nano-USD for assertions."""
    return round(usd * 1_000_000_000)


__all__ = ["ADMIN", "BACKENDS", "MASTER_KEY", "Enforcement"]
