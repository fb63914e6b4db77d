"""The spend ledger's statements: inserting rows (one at a time or a group commit) and
summing a scope's rows, for the record store and the Postgres counter store alike."""

from __future__ import annotations

from typing import Any, Final

import asyncpg
from asyncpg import exceptions as pg_errors
from asyncpg.pool import PoolConnectionProxy

from server.errors import InvalidArgument
from server.storage.base import LedgerEntry, LedgerInsert, ScopeKind
from server.storage.postgres_driver import UNAVAILABLE_ERRORS, or_none, to_timestamp, unavailable
from server.storage.postgres_rows import (
    LEDGER_COLUMNS,
    as_stored,
    ledger_args,
    ledger_from_row,
    returned,
)

# xact (migration 0002) is filled by its column default: the writing transaction's id.
_SQL_INSERT_SPEND: Final = (
    f"INSERT INTO spend_ledger ({LEDGER_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
    f" ON CONFLICT (request_id) DO NOTHING RETURNING {LEDGER_COLUMNS}, xact"
)
SQL_GET_SPEND: Final = f"SELECT {LEDGER_COLUMNS}, xact FROM spend_ledger WHERE request_id = $1"
# Group commit (issue 7): the rows of concurrent insert_spend calls as one statement, so one
# transaction and one commit. Every row of it gets the same xact, which is right: they
# become visible together. One array per column, in ledger_args' order; the statement's
# text does not depend on the number of rows, so it is prepared once per connection.
_SQL_INSERT_SPENDS: Final = (
    f"INSERT INTO spend_ledger ({LEDGER_COLUMNS})"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::numeric[],"
    " $5::timestamptz[], $6::timestamptz[], $7::text[], $8::text[], $9::bigint[],"
    " $10::bigint[], $11::jsonb[], $12::text[])"
    " ON CONFLICT (request_id) DO NOTHING RETURNING request_id, xact"
)
_SQL_GET_SPENDS: Final = (
    f"SELECT {LEDGER_COLUMNS}, xact FROM spend_ledger WHERE request_id = ANY($1::text[])"
)


def _sum_spend_sql(scope: str, *, by_user: bool, by_model: bool, as_of: bool) -> str:
    """One fixed statement per shape, each served by an index on (its columns, admitted_at):
    (team_id | key_id), (team_id, user_id) or (team_id | key_id, model). A NULL end ($3)
    means no upper bound; $4 is the user, then the model. ``as_of`` adds the snapshot of
    the statement that summed (a rebuilt counter keeps it)."""
    select = "COALESCE(SUM(cost), 0)" + (", pg_current_snapshot()::text" if as_of else "")
    where = [
        f"{scope} = $1",
        "admitted_at >= $2",
        "admitted_at < COALESCE($3::timestamptz, 'infinity')",
    ]
    if by_user:
        where.append("user_id = $4")
    if by_model:
        where.append(f"model = ${5 if by_user else 4}")
    return f"SELECT {select} FROM spend_ledger WHERE {' AND '.join(where)}"


# (scope column, by user, by model, as of) -> the statement.
_SQL_SUM_SPEND: Final = {
    (scope, by_user, by_model, as_of): _sum_spend_sql(
        scope, by_user=by_user, by_model=by_model, as_of=as_of
    )
    for scope in ("team_id", "key_id")
    for by_user in (False, True)
    for by_model in (False, True)
    for as_of in (False, True)
}


def sum_spend_query(
    kind: ScopeKind,
    scope_id: str,
    start: float,
    end: float | None,
    user_id: str,
    model: str,
    *,
    as_of: bool,
) -> tuple[str, list[Any]]:
    """The sum statement of a scope (and filters) and its arguments."""
    scope = "key_id" if kind is ScopeKind.KEY else "team_id"  # TEAM and MEMBER: the team
    query = _SQL_SUM_SPEND[scope, bool(user_id), bool(model), as_of]
    args: list[Any] = [scope_id, to_timestamp(start), or_none(to_timestamp, end)]
    args += [value for value in (user_id, model) if value]
    return query, args


async def _insert_one(
    conn: PoolConnectionProxy[asyncpg.Record], entry: LedgerEntry
) -> LedgerInsert:
    """Insert one ledger row unless its request_id exists; the stored row.

    A new row costs one round trip; a duplicate a second one to read the stored row.
    """
    try:
        row = await conn.fetchrow(_SQL_INSERT_SPEND, *ledger_args(entry))
    except pg_errors.CheckViolationError as exc:
        raise InvalidArgument(f"cost must not be negative, got {entry.cost_nanos}") from exc
    if row is not None:
        return LedgerInsert(True, ledger_from_row(row), row["xact"])
    # The ledger is append-only, so the conflicting row is still there.
    existing = returned(await conn.fetchrow(SQL_GET_SPEND, entry.request_id))
    return LedgerInsert(False, ledger_from_row(existing), existing["xact"])


async def insert_each(
    conn: PoolConnectionProxy[asyncpg.Record], entries: list[LedgerEntry]
) -> list[LedgerInsert | BaseException]:
    """:func:`_insert_one` for each entry in order, each in its own transaction.

    Each row's own error is its answer. If the connection fails, the rows before it keep
    their (committed) answers and the failing row and those after it get RecordsUnavailable,
    as each would have on its own.
    """
    results: list[LedgerInsert | BaseException] = []
    for entry in entries:
        try:
            results.append(await _insert_one(conn, entry))
        except UNAVAILABLE_ERRORS as exc:
            lost = unavailable(exc)
            lost.__cause__ = exc
            return results + [lost] * (len(entries) - len(results))
        except Exception as exc:  # this row's answer alone (InvalidArgument for a CHECK)
            results.append(exc)
    return results


async def insert_batch(
    conn: PoolConnectionProxy[asyncpg.Record], entries: list[LedgerEntry]
) -> list[LedgerInsert]:
    """Insert ``entries`` in one statement (one transaction); each entry's answer.

    A request_id that comes twice in the batch is inserted for its first entry only; the
    later ones are answered with the stored row, as if they had come after it. A row the
    statement did not insert conflicted with a committed row (ON CONFLICT waits for a
    concurrent writer's commit), which a second statement reads, as :func:`_insert_one`.
    """
    firsts: dict[str, LedgerEntry] = {}
    for entry in entries:
        firsts.setdefault(entry.request_id, entry)
    # Every batch writes its rows in request_id order, so two batches that share ids (a
    # retry racing its original, here or on another replica) wait on each other's rows in
    # the same order rather than deadlock. (Should one deadlock anyway, the statement fails
    # whole and _flush_spends retries its rows one at a time.)
    rows = sorted(firsts.values(), key=lambda entry: entry.request_id)
    columns = [list(column) for column in zip(*map(ledger_args, rows), strict=True)]
    inserted = {row["request_id"]: row for row in await conn.fetch(_SQL_INSERT_SPENDS, *columns)}
    conflicts = [request_id for request_id in firsts if request_id not in inserted]
    stored = {}
    if conflicts:  # the ledger is append-only, so the conflicting rows are still there
        stored = {row["request_id"]: row for row in await conn.fetch(_SQL_GET_SPENDS, conflicts)}
    results: list[LedgerInsert] = []
    answered: set[str] = set()
    for entry in entries:
        new = entry.request_id in inserted and entry.request_id not in answered
        answered.add(entry.request_id)
        written = inserted.get(entry.request_id)
        if written is not None:
            # Written just now: the stored row is the first entry, as the ledger holds it
            # (RETURNING only its xact saves decoding every column back).
            results.append(LedgerInsert(new, as_stored(firsts[entry.request_id]), written["xact"]))
        else:
            row = returned(stored.get(entry.request_id))
            results.append(LedgerInsert(new, ledger_from_row(row), row["xact"]))
    return results
