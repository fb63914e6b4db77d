"""The budgetd command line: serve, migrate, up."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from server.app import SQLITE_FILE, BudgetdServer
from server.config import Settings, load_settings
from server.errors import BudgetdError, ConfigError
from server.storage.postgres import migrate as migrate_postgres
from server.storage.sqlite import SqliteRecords

DESCRIPTION = """\
budgetd: a budget authority for API gateways. Gateways ask it before each paid request
whether an API key and its team may spend (CheckBudget) and tell it afterwards what the
request cost (RecordSpend). Money is exact; budgets reset on calendar windows.

Storage: with neither DATABASE_URL nor REDIS_URL set, budgetd keeps everything in one SQLite
file under BUDGETD_DATA_DIR (default ./.budgetd) with in-process counters (one instance).
Set DATABASE_URL=postgresql://... and REDIS_URL=redis://... to run many replicas.

Admin calls need 'authorization: Bearer <master key>': set BUDGETD_MASTER_KEY (or
LITELLM_MASTER_KEY, or general_settings.master_key in the config file).
"""

EPILOG = """\
examples:
  budgetd serve                                  # embedded default on 127.0.0.1:50051
  budgetd serve --config config.yaml --grpc-addr 0.0.0.0:50051
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
    commands.add_parser(
        "serve", parents=[common, serve], help="run the gRPC budget authority"
    ).set_defaults(run=_serve)
    commands.add_parser(
        "up",
        parents=[common, serve],
        help="run everything a gateway needs in one process (what `make run` starts)",
    ).set_defaults(run=_serve)
    commands.add_parser(
        "migrate", parents=[common], help="apply pending database migrations and exit"
    ).set_defaults(run=_migrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``budgetd`` console script."""
    args = build_parser().parse_args(argv)

    overrides = {
        "grpc_addr": getattr(args, "grpc_addr", None),
        "metrics_addr": getattr(args, "metrics_addr", None),
        "log_level": args.log_level,
    }
    try:
        settings = load_settings(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"budgetd: configuration error:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(asyncio.run(args.run(settings)))
    except BudgetdError as exc:
        print(f"budgetd: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"budgetd: {exc}", file=sys.stderr)
        return 1


async def _serve(settings: Settings) -> int:
    server = BudgetdServer(settings)
    await server.start()
    if settings.master_key is None:
        logging.getLogger("budgetd").warning(
            "no master key configured: admin RPCs are refused (set BUDGETD_MASTER_KEY)"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("budgetd").info("shutting down: draining in-flight requests")
    await server.stop(grace=5.0)
    return 0


async def _migrate(settings: Settings) -> int:
    if settings.database_url:
        applied = await migrate_postgres(settings.database_url)
        where = "postgres"
    else:
        store = SqliteRecords(settings.data_dir / SQLITE_FILE)
        await store.start()
        applied = list(store.applied_migrations)
        await store.close()
        where = str(settings.data_dir / SQLITE_FILE)
    print(f"budgetd migrate: {where}: applied {applied or 'nothing (up to date)'}")
    return 0
