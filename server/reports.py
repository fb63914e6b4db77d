"""Spend reads (GetSpend): what the ledger says was spent over a range of calendar days.

Days are calendar days on the wall clock of ``budgetd.timezone``, the same clock budget
windows align to, and a spend belongs to the day its request was *admitted* (as it belongs
to that window), so a daily report adds up to what the daily budgets counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from server import validation
from server.clock import Clock
from server.errors import InvalidArgument, NotFound
from server.identity import hash_api_key
from server.storage.base import RecordStore, SpendGroup, SpendQuery, SpendRow

DEFAULT_DAYS: Final = 30
"""Days in a report whose start_date is not given (today included)."""
DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 10_000
MAX_DAYS: Final = 3660
"""The longest range accepted (about ten years): bounds the work of one report."""


@dataclass(frozen=True, slots=True)
class SpendRequest:
    """A GetSpend question, off the wire; dates are ``YYYY-MM-DD`` or "" for the default."""

    start_date: str = ""
    end_date: str = ""
    group_by: tuple[SpendGroup, ...] = ()
    team_id: str = ""
    key_id: str = ""
    key: str = ""  # a plaintext key, looked up by its hash
    model: str = ""
    limit: int = 0


@dataclass(frozen=True, slots=True)
class SpendReport:
    """The rows of a report, the exact total of everything selected, and the range used."""

    rows: list[SpendRow]
    total_nanos: int
    truncated: bool
    start_date: date
    end_date: date
    timezone: str


class SpendReports:
    """Answers GetSpend from the record store (the ledger is the source of truth)."""

    def __init__(self, records: RecordStore, clock: Clock, timezone: str) -> None:
        self._records = records
        self._clock = clock
        self._timezone = timezone
        self._tz = ZoneInfo(timezone)

    async def spend(self, req: SpendRequest) -> SpendReport:
        """Rows per group over the range, at most ``limit`` of them, and the total."""
        first, last = self._range(req.start_date, req.end_date)
        limit = _limit(req.limit)
        query = SpendQuery(
            start=self._midnight(first),
            end=self._midnight(last + timedelta(days=1)),
            group_by=tuple(dict.fromkeys(req.group_by)),
            team_id=validation.identifier(req.team_id, "team_id", required=False),
            key_id=await self._key_id(req.key_id, req.key),
            model=validation.text(req.model, "model"),
            timezone=self._timezone,
            limit=limit + 1,  # one more than asked tells whether there were more
        )
        rows = await self._records.spend_report(query)
        truncated = len(rows) > limit
        rows = rows[:limit]
        if truncated:
            # The rows shown do not add up to the total: ask the ledger for it.
            total_rows = await self._records.spend_report(replace(query, group_by=(), limit=1))
            total = total_rows[0].spend_nanos if total_rows else 0
        else:
            total = sum(row.spend_nanos for row in rows)
        return SpendReport(rows, total, truncated, first, last, self._timezone)

    def _range(self, start_date: str, end_date: str) -> tuple[date, date]:
        today = datetime.fromtimestamp(self._clock.now(), self._tz).date()
        last = _date(end_date, "end_date") if end_date else today
        first = (
            _date(start_date, "start_date")
            if start_date
            else last - timedelta(days=DEFAULT_DAYS - 1)
        )
        if first > last:
            raise InvalidArgument(f"start_date {first} is after end_date {last}")
        if (last - first).days >= MAX_DAYS:
            raise InvalidArgument(f"the range is longer than {MAX_DAYS} days; ask for less")
        return first, last

    def _midnight(self, day: date) -> float:
        """The instant the day starts on the configured wall clock."""
        return datetime.combine(day, time(0), self._tz).timestamp()

    async def _key_id(self, key_id: str, key: str) -> str:
        if key_id:
            return validation.identifier(key_id, "key_id")
        if not key:
            return ""
        validation.text(key, "key")
        found = await self._records.get_key_by_hash(hash_api_key(key))
        if found is None:
            raise NotFound("key not found")
        return found.key_id


def _date(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(
            f"{name} must be a date like 2024-06-13, got {value[:40]!r}"
        ) from None


def _limit(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"limit must not be negative, got {value}")
    return min(value or DEFAULT_LIMIT, MAX_LIMIT)
