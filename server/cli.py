"""The budgetd command line: serve, bridge, up, migrate."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from server.app import SQLITE_FILE, BudgetdServer, split_address
from server.config import Settings, load_settings
from server.errors import BudgetdError, ConfigError
from server.logging_setup import configure as configure_logging
from server.workers import check_workers, supervise, worker_settings

if TYPE_CHECKING:
    from clients.bridge import Bridge

log = logging.getLogger("budgetd")

DESCRIPTION = """\
budgetd: a budget authority for API gateways. Gateways ask it before each paid request
whether an API key and its team may spend (CheckBudget) and tell it afterwards what the
request cost (RecordSpend). Money is exact; budgets reset on calendar windows.

Storage: with neither DATABASE_URL nor REDIS_URL set, budgetd keeps everything in one SQLite
file under BUDGETD_DATA_DIR (default ./.budgetd) with in-process counters (one instance).
Set DATABASE_URL=postgresql://... and REDIS_URL=redis://... to run many replicas.

Gateways that cannot speak gRPC (nginx auth_request, Traefik forwardAuth, Envoy's HTTP
ext_authz) and LiteLLM's admin API (/team/new, /key/generate, ...) use the HTTP bridge:
`budgetd bridge` on its own, or `budgetd up` for budgetd and the bridge in one process.

Admin calls need 'authorization: Bearer <master key>': set BUDGETD_MASTER_KEY (or
LITELLM_MASTER_KEY, or general_settings.master_key in the config file).
"""

EPILOG = """\
examples:
  budgetd up                                     # gRPC on :50051, HTTP bridge on :4000
  budgetd serve                                  # embedded default on 127.0.0.1:50051
  budgetd serve --config config.yaml --grpc-addr 0.0.0.0:50051
  budgetd bridge --listen 0.0.0.0:4000 --target budgetd.internal:50051
  DATABASE_URL=postgresql://localhost/budgetd budgetd migrate
  grpcurl -plaintext localhost:50051 list        # reflection is on
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and --help)."""
    parser = argparse.ArgumentParser(
        prog="budgetd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="FILE", help="YAML config (LiteLLM's shape + a budgetd: section)"
    )
    common.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve = argparse.ArgumentParser(add_help=False)
    serve.add_argument("--grpc-addr", metavar="HOST:PORT", help="default 127.0.0.1:50051")
    serve.add_argument("--metrics-addr", metavar="HOST:PORT", help="default 127.0.0.1:9464")
    listen = argparse.ArgumentParser(add_help=False)
    listen.add_argument(
        "--listen", metavar="HOST:PORT", help="the HTTP bridge's address (default 127.0.0.1:4000)"
    )
    serve_cmd = commands.add_parser(
        "serve", parents=[common, serve], help="run the gRPC budget authority"
    )
    serve_cmd.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N processes sharing the port with SO_REUSEPORT (needs DATABASE_URL and "
        "REDIS_URL and a fixed port; default 1)",
    )
    serve_cmd.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve_cmd.set_defaults(run=_serve)
    bridge = commands.add_parser(
        "bridge",
        parents=[common, listen],
        help="run the HTTP bridge (nginx, Traefik, Envoy HTTP ext_authz, LiteLLM admin API) "
        "in front of a running budgetd",
        description="The HTTP translation client: a gRPC client of budgetd with an HTTP face. "
        "Endpoints: /envoy/authz/*, /nginx/auth, /traefik/auth, POST /spend, LiteLLM's "
        "/team/new, /team/info, /team/update, /key/generate, /key/info, /key/delete, and "
        "/healthz, /health/readiness.",
    )
    bridge.add_argument(
        "--target", metavar="HOST:PORT", help="budgetd's gRPC address (default 127.0.0.1:50051)"
    )
    bridge.set_defaults(run=_bridge)
    commands.add_parser(
        "up",
        parents=[common, serve, listen],
        help="run budgetd and the HTTP bridge in one process (what `make run` starts)",
        description="budgetd's gRPC server plus the HTTP bridge, which asks that server.",
    ).set_defaults(run=_up)
    commands.add_parser(
        "migrate", parents=[common], help="apply pending database migrations and exit"
    ).set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``budgetd`` console script."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw)

    overrides = {
        "grpc_addr": getattr(args, "grpc_addr", None),
        "metrics_addr": getattr(args, "metrics_addr", None),
        "bridge_listen": getattr(args, "listen", None),
        "bridge_target": getattr(args, "target", None),
        "log_level": args.log_level,
    }
    try:
        settings = load_settings(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"budgetd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    workers = getattr(args, "workers", 1)
    index = getattr(args, "worker_index", None)
    try:
        check_workers(settings, workers)
    except ConfigError as exc:
        print(f"budgetd: {exc}", file=sys.stderr)
        return 2
    if index is not None:
        settings = worker_settings(settings, index)
    logs = configure_logging(settings.log_level)
    try:
        if workers > 1:
            return int(asyncio.run(_serve_workers(settings, raw, workers)))
        if index is not None:
            return int(asyncio.run(_serve(settings, reuse_port=True)))
        return int(asyncio.run(args.run(settings)))
    except BudgetdError as exc:
        log.error("budgetd stopped: %s", exc, extra={"event": "failed"})
        logs.close()
        print(f"budgetd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("budgetd stopped: %s", exc, extra={"event": "failed"})
        logs.close()
        print(f"budgetd: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.close()


def _settle_heap() -> None:
    """Move what start-up allocated (modules, protos, config) out of the collector's way.

    Everything alive once serving is kept for the life of the process; frozen, the cyclic
    collector never scans it again, so its full collections stay short instead of pausing
    every request for tens of milliseconds now and then.
    """
    gc.collect()
    gc.freeze()


async def _serve(settings: Settings, *, reuse_port: bool = False) -> int:
    stop = _stop_on_signals()
    server = BudgetdServer(settings, reuse_port=reuse_port)
    await server.start()
    _settle_heap()
    _started(settings, server)
    await stop.wait()
    _stopping()
    await server.stop(grace=5.0)
    log.info("budgetd stopped", extra={"event": "stopped"})
    return 0


async def _serve_workers(settings: Settings, argv: Sequence[str], workers: int) -> int:
    """Migrate once, then run the workers (each its own ``budgetd serve``)."""
    assert settings.database_url  # check_workers
    from server.storage.postgres_migrations import migrate as migrate_postgres  # noqa: PLC0415

    await migrate_postgres(settings.database_url)
    return await supervise(argv, workers)


async def _bridge(settings: Settings) -> int:
    stop = _stop_on_signals()
    from clients.bridge import Bridge, BridgeConfig  # noqa: PLC0415 - `serve` starts faster

    bridge = Bridge(BridgeConfig.from_settings(settings))
    await bridge.start()
    log.info(
        "bridge started",
        extra={"event": "started", "bridge_url": bridge.url, "target": bridge.config.target},
    )
    if not await bridge.client.serving():
        log.warning(
            "budgetd at %s is not serving yet: requests get 503 until it is",
            bridge.config.target,
        )
    await stop.wait()
    _stopping()
    await bridge.stop()
    log.info("bridge stopped", extra={"event": "stopped"})
    return 0


async def _up(settings: Settings) -> int:
    stop = _stop_on_signals()
    server = BudgetdServer(settings)
    port = await server.start()
    from clients.bridge import Bridge, BridgeConfig  # noqa: PLC0415 - `serve` starts faster

    bridge = Bridge(BridgeConfig.from_settings(settings, target=_local_target(settings, port)))
    try:
        await bridge.start()
    except OSError:
        await server.stop(grace=1.0)
        raise
    _started(settings, server, bridge)
    await stop.wait()
    _stopping()
    # The bridge first: its in-flight requests still need the server to answer them.
    await bridge.stop()
    await server.stop(grace=5.0)
    log.info("budgetd stopped", extra={"event": "stopped"})
    return 0


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (installed before starting, so none is missed)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _started(settings: Settings, server: BudgetdServer, bridge: Bridge | None = None) -> None:
    """The lifecycle line of a started server, and warnings about what is off."""
    fields: dict[str, object] = {
        "event": "started",
        "grpc_port": server.port,
        "metrics_port": server.metrics_port,
        "storage": server.stores.description,
    }
    if bridge is not None:
        fields["bridge_url"] = bridge.url
        fields["admin_ui"] = f"{bridge.url}/ui/"
    log.info("budgetd started", extra=fields)
    if settings.master_key is None:
        log.warning("no master key configured: admin RPCs are refused (set BUDGETD_MASTER_KEY)")
    if not settings.metrics_enabled and "prometheus" in settings.success_callback:
        log.warning(
            "litellm_settings.success_callback lists prometheus but budgetd.metrics is false:"
            " /metrics is off"
        )


def _stopping() -> None:
    log.info("shutting down: draining in-flight requests", extra={"event": "stopping"})


def _local_target(settings: Settings, port: int) -> str:
    """How the bridge in this process reaches the server: its bound port, and loopback when
    the server listens on every address."""
    host, _ = split_address(settings.grpc_addr)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _migrate(settings: Settings) -> int:
    # Each store's module (and its driver) is imported only by the command that uses it.
    if settings.database_url:
        from server.storage.postgres_migrations import migrate as migrate_postgres  # noqa: PLC0415

        applied = await migrate_postgres(settings.database_url)
        where = "postgres"
    else:
        from server.storage.sqlite import SqliteRecords  # noqa: PLC0415

        store = SqliteRecords(settings.data_dir / SQLITE_FILE)
        await store.start()
        applied = list(store.applied_migrations)
        await store.close()
        where = str(settings.data_dir / SQLITE_FILE)
    print(f"budgetd migrate: {where}: applied {applied or 'nothing (up to date)'}")
    return 0


if __name__ == "__main__":  # the workers of `budgetd serve --workers N` run this way
    sys.exit(main())
