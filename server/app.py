"""Wiring: storage from settings, the gRPC server with health and reflection, shutdown order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import tzinfo
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from server.admin import Admin
from server.api import BudgetAuthorityService
from server.authority import Authority
from server.budget_metrics import BudgetCollector
from server.clock import Clock, SystemClock
from server.envoy import SERVICE_NAMES as ENVOY_SERVICES
from server.envoy import add_envoy_services
from server.envoy.ext_proc import EnvoySpend
from server.errors import Unavailable
from server.gen.budgetd.v1 import budgetd_pb2_grpc
from server.identity import ReservationCodec
from server.metrics import Metrics, MetricsServer
from server.principals import Principals
from server.registration import add_health_and_reflection, add_service
from server.reports import SpendReports
from server.settings import Settings
from server.spool import Spool
from server.storage.base import CounterStore, RecordStore
from server.storage.batching import Batching
from server.storage.cached_records import CachedRecords
from server.storage.failover_counters import FailoverCounters
from server.storage.leasing import LeasingCounters
from server.storage.memory_counters import MemoryCounters

if TYPE_CHECKING:
    from server.jwt_auth import JwtVerifier

log = logging.getLogger("budgetd")

SERVICE_NAME = "budgetd.v1.BudgetAuthority"
SQLITE_FILE = "budgetd.sqlite3"
SPOOL_REPLAY_INTERVAL = 1.0
"""Seconds between attempts to replay a non-empty spool into the ledger."""


@dataclass(frozen=True, slots=True)
class Stores:
    records: RecordStore
    counters: CounterStore
    description: str
    # Where RecordSpend keeps acknowledged spend while Postgres is down (postgres_down: spool).
    spool: Spool | None = None


def make_stores(settings: Settings) -> Stores:
    """The record and counter stores the settings ask for (embedded when none are given).

    With Postgres, keys and teams are read through a cache (``record_cache_ttl``) that
    keeps answering from what it has while Postgres is down when ``postgres_down`` is
    ``spool``, and a spool keeps acknowledged spend on disk meanwhile. With Postgres and
    Redis and ``redis_down: postgres``, counters fall back to the exact Postgres path while
    Redis is down.

    Each backend's module (and its driver: asyncpg, redis-py, sqlite3) is imported only when
    the settings use it, so a start loads only what it serves with.
    """
    spool = None
    if settings.database_url:
        from server.storage.postgres import PostgresRecords  # noqa: PLC0415

        riding_out = settings.postgres_down == "spool"
        records: RecordStore = CachedRecords(
            PostgresRecords(settings.database_url),
            ttl=settings.record_cache_ttl,
            serve_stale=riding_out,
        )
        spool = Spool(settings.spool_path) if riding_out else None
        where = f"postgres (postgres_down: {settings.postgres_down})"
    else:
        from server.storage.sqlite import SqliteRecords  # noqa: PLC0415

        # One process owns the file and writes through this cache, so it is never stale;
        # it keeps SQLite's thread hops off the decision path.
        records = CachedRecords(
            SqliteRecords(settings.data_dir / SQLITE_FILE),
            ttl=settings.record_cache_ttl,
            serve_stale=False,
        )
        where = f"sqlite at {settings.data_dir / SQLITE_FILE}"
    if settings.redis_url:
        from server.storage.redis_counters import RedisCounters  # noqa: PLC0415

        redis = RedisCounters(settings.redis_url, cluster=settings.redis_cluster)
        counters: CounterStore = redis
        if settings.database_url and settings.redis_down == "postgres":
            from server.storage.postgres_counters import PostgresCounters  # noqa: PLC0415

            # The record store (same database) applies the migrations in the same start.
            exact = PostgresCounters(settings.database_url, apply_migrations=False)
            counters = FailoverCounters(redis, exact)
        where += f" + redis counters (redis_down: {settings.redis_down})"
        if settings.lease_seconds > 0:
            counters = LeasingCounters(counters, lease_seconds=settings.lease_seconds)
            where += f", leases of {settings.lease_seconds:g}s"
    else:
        counters = MemoryCounters()
        where += " + in-process counters (single instance)"
        if settings.database_url:
            log.warning(
                "DATABASE_URL is set but REDIS_URL is not: counters are in-process, so only "
                "one budgetd replica may run against this database"
            )
    return Stores(records, counters, where, spool)


class BudgetdServer:
    """One budgetd gRPC server: BudgetAuthority, Envoy ext_authz and ext_proc, grpc.health.v1
    and reflection on one port."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        stores: Stores | None = None,
        reuse_port: bool = False,
    ) -> None:
        self._settings = settings
        self._reuse_port = reuse_port
        self._clock = clock or SystemClock()
        self._stores = stores or make_stores(settings)
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self.port = 0
        self.metrics = Metrics()
        self._metrics_server: MetricsServer | None = None
        self.authority: Authority | None = None
        self.admin: Admin | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._envoy_spend: EnvoySpend | None = None
        self._jwt: JwtVerifier | None = None

    @property
    def stores(self) -> Stores:
        return self._stores

    @property
    def metrics_port(self) -> int:
        """The bound metrics port (0 when metrics are off)."""
        return self._metrics_server.port if self._metrics_server else 0

    async def start(self) -> int:
        """Open storage (migrating it), bind, serve; returns the bound port."""
        settings = self._settings
        codec = ReservationCodec(await self._open_stores())
        tz: tzinfo = settings.tzinfo
        spool = self._stores.spool
        if settings.jwt.enabled:
            # PyJWT, cryptography and aiohttp are loaded only when JWTs are accepted.
            from server.jwt_auth import JwtVerifier  # noqa: PLC0415

            self._jwt = JwtVerifier(settings.jwt, clock=self._clock)
            await self._jwt.start()
        principals = Principals(
            self._stores.records,
            jwt=self._jwt,
            team_id_upsert=settings.jwt.team_id_upsert,
            default_teams=settings.default_team_settings,
        )
        self.authority = Authority(
            self._stores.records,
            self._stores.counters,
            self._clock,
            codec,
            enforcement=settings.enforcement,
            reservation_ttl=settings.reservation_ttl,
            tz=tz,
            prices=settings.prices,
            spool=spool,
            principals=principals,
        )
        if spool is not None:
            # What a crashed run acknowledged goes into the ledger before anything is served.
            if await spool.open():
                await self._replay_spool()
            self._replayer = asyncio.create_task(self._replay_loop())
        counters = self._stores.counters
        if isinstance(counters, LeasingCounters):
            counters = counters.inner
        if isinstance(counters, FailoverCounters):
            counters.on_failover = self.metrics.counter_failovers.inc
        self.metrics.watch_failures(
            spool_depth=(lambda: spool.depth) if spool is not None else None,
            on_postgres=(lambda: counters.failed_over)
            if isinstance(counters, FailoverCounters)
            else None,
        )
        self._watch_batching(counters)
        self.admin = Admin(self._stores.records, self._stores.counters, self._clock, tz=tz)
        options = _SERVER_OPTIONS
        if self._reuse_port:  # one of the workers of `budgetd serve --workers N`
            options = (("grpc.so_reuseport", 1), *options[1:])
        server = grpc.aio.server(options=options)
        self._add_services(server, settings)
        try:
            self.port = server.add_insecure_port(settings.grpc_addr)
        except RuntimeError as exc:  # grpcio reports a taken port this way
            raise OSError(f"cannot bind the gRPC address {settings.grpc_addr}: {exc}") from exc
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC address {settings.grpc_addr}")
        await server.start()
        self._server = server
        if settings.metrics_enabled:
            # Budgets, holds and drift are read from shared state when Prometheus scrapes.
            budgets = BudgetCollector(self._stores.records, self._stores.counters, self._clock, tz)
            budgets.attach(self.metrics)
            host, port = split_address(settings.metrics_addr)
            self._metrics_server = MetricsServer(self.metrics, host, port)
            await self._metrics_server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "budgetd serving on %s (port %d), storage: %s",
            settings.grpc_addr,
            self.port,
            self._stores.description,
        )
        return self.port

    def _watch_batching(self, counters: CounterStore) -> None:
        """Point the batching metrics at the stores that batch: the ledger's group commits
        (Postgres, under the record cache) and the Redis script pipelines (``counters``,
        already without its lease layer; under the Postgres failover, if any)."""
        records = self._stores.records
        if isinstance(records, CachedRecords):
            records = records.inner
        if isinstance(counters, FailoverCounters):
            counters = counters.redis
        self.metrics.watch_batching(
            ledger=records if isinstance(records, Batching) else None,
            redis=counters if isinstance(counters, Batching) else None,
        )

    def _add_services(self, server: grpc.aio.Server, settings: Settings) -> None:
        """BudgetAuthority, Envoy's two services, health and reflection on ``server``; only
        the decision path's methods are registered with grpc (server.registration)."""
        assert self.authority is not None and self.admin is not None
        reports = SpendReports(self._stores.records, self._clock, settings.timezone)
        service = BudgetAuthorityService(
            self.authority, self.admin, settings.master_key, self.metrics, reports
        )
        add_service(
            budgetd_pb2_grpc.add_BudgetAuthorityServicer_to_server, service, server,
            bytes_methods=("CheckBudget",),
        )  # fmt: skip
        self._envoy_spend = add_envoy_services(server, self.authority, settings, self.metrics)
        add_health_and_reflection(server, self._health, (SERVICE_NAME, *ENVOY_SERVICES))

    async def _open_stores(self) -> bytes:
        """Start the record and counter stores (each migrates and connects) side by side, so
        their round trips overlap; returns the instance secret.

        When both fail, the record store's error is the one raised, as when they started one
        after the other; either way both have finished starting (or failing) by then.
        """
        records, counters = self._stores.records, self._stores.counters

        async def open_records() -> bytes:
            await records.start()
            return await records.instance_secret()

        secret, started = await asyncio.gather(
            open_records(), counters.start(), return_exceptions=True
        )
        for outcome in (secret, started):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(secret, bytes)
        return secret

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful stop: health NOT_SERVING first, drain in-flight RPCs, close storage."""
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        if self._server is not None:
            await self._health.enter_graceful_shutdown()
            await self._server.stop(grace)
            self._server = None
        if self._envoy_spend is not None:
            # Spend that Envoy reported just before the stop is recorded before storage closes.
            await self._envoy_spend.drain()
        await self._stop_spool(grace)
        if self._jwt is not None:
            await self._jwt.close()
            self._jwt = None
        await self._stores.counters.close()
        await self._stores.records.close()

    async def _replay_spool(self) -> None:
        """One replay of the spool into the ledger; an outage just leaves it for later."""
        spool = self._stores.spool
        if spool is None or self.authority is None:
            return
        try:
            replayed, conflicts = await spool.replay(
                self._stores.records, self.authority.settler.settle_row
            )
        except Unavailable as exc:
            log.debug("spool replay postponed: %s", exc)
            return
        if replayed or conflicts:
            log.warning(
                "replayed %d spooled spends into the ledger (%d conflicts, see %s)",
                replayed, conflicts, spool.directory,
            )  # fmt: skip

    async def _replay_loop(self) -> None:
        """Replay the spool every SPOOL_REPLAY_INTERVAL seconds while it is not empty."""
        spool = self._stores.spool
        assert spool is not None
        while True:
            await asyncio.sleep(SPOOL_REPLAY_INTERVAL)
            if spool.depth:
                try:
                    await self._replay_spool()
                except Exception:  # a bug must not end the replays: log it, try again
                    log.exception("spool replay failed")

    async def _stop_spool(self, grace: float) -> None:
        """Stop the replay task, finish writes, and make one last bounded replay attempt."""
        spool = self._stores.spool
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
            self._replayer = None
        if spool is None:
            return
        await spool.close()
        if spool.depth:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._replay_spool(), grace)
        if spool.depth:
            log.warning(
                "stopping with %d spends spooled in %s: they are replayed into the ledger at "
                "the next start with this spool_dir",
                spool.depth, spool.directory,
            )  # fmt: skip


def split_address(address: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port" (already validated by the config)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # Off unless `--workers` shares a port on purpose (first in this tuple: the workers
    # replace it): a second budgetd on the same port must fail to start, not split traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)
