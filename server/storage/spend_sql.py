"""The SQL of spend reports, for Postgres and SQLite, built from fixed fragments.

A report sums the ledger over ``[start, end)`` of ``admitted_at`` (the instant that picks a
spend's budget windows, so a report and the budgets agree on which day a spend belongs to),
grouped by any of team, key, model and day. Only the fragments below ever reach the SQL
text; every value the caller chose (bounds, ids, the time zone, the limit) is a parameter.

Money stays exact: Postgres sums NUMERIC and SQLite sums INTEGER nano-USD; the caller
converts the sum, never a float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from server.storage.base import SpendGroup, SpendQuery, SpendRow

# The order rows come out in, whatever order the caller listed its groups in.
_ORDER: Final = (SpendGroup.DAY, SpendGroup.TEAM, SpendGroup.KEY, SpendGroup.MODEL)


@dataclass(frozen=True, slots=True)
class _Dialect:
    """How one database spells what differs between the two."""

    placeholder: Callable[[int], str]  # the n-th parameter (1-based)
    day: str  # the calendar day of admitted_at in the zone given by {tz}
    cost: str  # the ledger's cost column
    model: str  # the model, "" when none was recorded


POSTGRES: Final = _Dialect(
    placeholder=lambda n: f"${n}",
    day="to_char(l.admitted_at AT TIME ZONE {tz}, 'YYYY-MM-DD')",
    cost="l.cost",
    model="COALESCE(l.model, '')",
)
SQLITE: Final = _Dialect(
    placeholder=lambda n: "?",
    # A Python function registered on the connection (SQLite has no time zones).
    day="budgetd_local_day(l.admitted_at, {tz})",
    cost="l.cost_nanos",
    model="l.model",
)


@dataclass
class _Builder:
    dialect: _Dialect
    params: list[Any] = field(default_factory=list)

    def param(self, value: Any) -> str:
        self.params.append(value)
        return self.dialect.placeholder(len(self.params))


def spend_report_sql(
    dialect: _Dialect, query: SpendQuery, start: Any, end: Any
) -> tuple[str, list[Any]]:
    """The statement and its parameters; ``start``/``end`` are the bounds in the database's
    own type. Columns: spend, requests, prompt_tokens, completion_tokens, then
    :data:`DIMENSION_COLUMNS` (NULL for a dimension not grouped by)."""
    # Parameters are added in the order they appear in the text (SQLite's are positional):
    # the select list first, then the conditions, then the limit.
    b = _Builder(dialect)
    columns: dict[str, str] = {}
    joins: list[str] = []
    for group in (g for g in _ORDER if g in query.group_by):
        if group is SpendGroup.DAY:
            columns["day"] = dialect.day.format(tz=b.param(query.timezone))
        elif group is SpendGroup.TEAM:
            columns.update(team_id="l.team_id", team_alias="t.team_alias")
            joins.append("LEFT JOIN teams t ON t.team_id = l.team_id")
        elif group is SpendGroup.KEY:
            columns.update(key_id="l.key_id", key_alias="k.key_alias", key_hash="k.key_hash")
            joins.append("LEFT JOIN api_keys k ON k.key_id = l.key_id")
        else:
            columns["model"] = dialect.model
    where = [f"l.admitted_at >= {b.param(start)}", f"l.admitted_at < {b.param(end)}"]
    for column, value in (("team_id", query.team_id), ("key_id", query.key_id)):
        if value:
            where.append(f"l.{column} = {b.param(value)}")
    if query.model:
        where.append(f"{dialect.model} = {b.param(query.model)}")
    select = [
        f"COALESCE(SUM({dialect.cost}), 0) AS spend",
        "COUNT(*) AS requests",
        "COALESCE(SUM(l.prompt_tokens), 0) AS prompt_tokens",
        "COALESCE(SUM(l.completion_tokens), 0) AS completion_tokens",
        *(f"{columns.get(name, 'NULL')} AS {name}" for name in DIMENSION_COLUMNS),
    ]
    # Grouped and ordered by select positions: the day's expression holds a parameter,
    # which must not be written (and bound) twice.
    positions = [
        str(_FIRST_DIMENSION + DIMENSION_COLUMNS.index(name))
        for name in DIMENSION_COLUMNS
        if name in columns
    ]
    sql = f"SELECT {', '.join(select)} FROM spend_ledger l"
    sql += "".join(f" {join}" for join in joins)
    sql += " WHERE " + " AND ".join(where)
    if positions:
        sql += f" GROUP BY {', '.join(positions)} ORDER BY {', '.join(positions)}"
    sql += f" LIMIT {b.param(query.limit)}"
    return sql, b.params


# The dimension columns of every report row, in select order (after the four sums).
DIMENSION_COLUMNS: Final = (
    "day",
    "team_id",
    "team_alias",
    "key_id",
    "key_alias",
    "key_hash",
    "model",
)
_FIRST_DIMENSION: Final = 5  # 1-based select position of "day"


def spend_row(values: Sequence[Any], spend_nanos: int) -> SpendRow:
    """A report row from a result row (by position), with its spend already exact nanos."""
    dims = dict(zip(DIMENSION_COLUMNS, values[_FIRST_DIMENSION - 1 :], strict=True))
    return SpendRow(
        spend_nanos=spend_nanos,
        requests=int(values[1]),
        prompt_tokens=int(values[2]),
        completion_tokens=int(values[3]),
        **{name: value or "" for name, value in dims.items()},
    )


def local_day(instant: float, timezone: str) -> str:
    """SQLite's ``budgetd_local_day``: the calendar day (YYYY-MM-DD) of Unix seconds in a zone."""
    return datetime.fromtimestamp(instant, ZoneInfo(timezone)).date().isoformat()
