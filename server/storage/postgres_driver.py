"""What the Postgres stores share: one translation of outages, one conversion of instants.

Both :mod:`server.storage.postgres` (the records) and :mod:`server.storage.postgres_counters`
(the counters' fallback) reach Postgres through asyncpg; a connection-level failure must
reach their callers as :class:`~server.errors.Unavailable` in the same way, and an instant
must become the same timestamptz in both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

import asyncpg
from asyncpg import exceptions as pg_errors

from server.errors import RecordsUnavailable, Unavailable

_In = TypeVar("_In")
_Out = TypeVar("_Out")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

# Failures of the connection rather than of the statement: the database is unreachable,
# shutting down, out of connections or too slow. (In Python 3.11 asyncio.TimeoutError is
# TimeoutError, an OSError; both are named for the reader.)
UNAVAILABLE_ERRORS: Final = (
    OSError,
    asyncio.TimeoutError,
    pg_errors.PostgresConnectionError,  # SQLSTATE class 08, incl. ConnectionDoesNotExistError
    pg_errors.InterfaceError,  # closed connection or pool
    pg_errors.OperatorInterventionError,  # class 57: CannotConnectNow, admin/crash shutdown
    pg_errors.InsufficientResourcesError,  # class 53: TooManyConnections, out of memory/disk
)


@asynccontextmanager
async def driver_errors(
    error: type[Unavailable] = RecordsUnavailable,
) -> AsyncIterator[None]:
    """Translate connection-level driver failures into ``error`` (the one place that does).

    The record store reports :class:`RecordsUnavailable` (the source of truth is down, which
    the decision path may ride out); the Postgres counter store passes plain Unavailable.
    """
    try:
        yield
    except UNAVAILABLE_ERRORS as exc:
        raise unavailable(exc, error) from exc


def unavailable(exc: BaseException, error: type[Unavailable] = RecordsUnavailable) -> Unavailable:
    """The ``error`` that reports the connection-level failure ``exc``."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return error(f"postgres unavailable: {detail}")


async def keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pools' release hook: nothing to undo, so no round trip.

    asyncpg's default reset sends four statements (unlock advisory locks, close cursors,
    UNLISTEN, RESET ALL) every time a connection goes back to the pool: one more round trip
    per query. budgetd keeps no session state: its advisory locks are transaction-level, it
    never LISTENs, SETs or leaves a cursor open; and asyncpg rolls back an open transaction
    before calling this.
    """


async def init_connection(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Make json/jsonb round-trip as Python objects on every pooled connection."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


def to_micros(seconds: float) -> int:
    """Unix seconds as whole microseconds since the epoch, floored: what a timestamptz holds.

    Exact (integer arithmetic on the float's ratio) and floored rather than rounded, so an
    instant never crosses a whole-second window boundary on its way into the ledger.
    """
    numerator, denominator = seconds.as_integer_ratio()
    return numerator * 1_000_000 // denominator


def to_timestamp(seconds: float) -> datetime:
    """Unix seconds as a timestamptz, floored to Postgres' microsecond resolution."""
    return _EPOCH + timedelta(microseconds=to_micros(seconds))


def or_none(convert: Callable[[_In], _Out], value: _In | None) -> _Out | None:
    """``convert(value)``, with NULL (None) passed through."""
    return None if value is None else convert(value)
