"""Budget windows: ``budget_duration`` values and the aligned window they put an instant in.

The window is part of a counter's identity (its start instant), so spend resets exactly at
the window's end with no sweeper job, and ``budget_reset_at`` is the window's end.

The rule, on the wall clock of the configured time zone (UTC by default):

* ``Ns``, ``Nm``, ``Nh`` up to one day: the day is cut into periods of that length starting
  at midnight; a period that would cross the next midnight ends there (``1h`` resets at the
  top of every hour, ``7h`` at 00:00, 07:00, 14:00 and 21:00).
* ``Ns``, ``Nm``, ``Nh`` longer than a day: periods of that length counted from
  1970-01-01T00:00.
* ``Nd``: periods of N days counted from 1970-01-01 (``1d`` resets at every midnight).
  ``30d`` means one calendar month, as in LiteLLM's documentation.
* ``Nmo``: periods of N calendar months counted from January 1970, starting at midnight on
  the first (``1mo`` monthly, ``3mo`` quarterly, ``12mo`` yearly).

Where a time zone changes its clocks, a window of at most a day (``Ns``, ``Nm``, ``Nh`` up
to 24h, ``1d``) resets at every instant the wall clock shows one of its starts: when the
clocks go back, the repeated ``1h`` (or ``1m``, ``1s``) periods are windows of their own;
a period the change cuts into (``2h`` from 00:00 to 02:00 when 01:00-02:00 repeats, or one
the jump forward skips) runs from the last start shown before the change to the first one
shown after it. Every instant is in exactly one window, and ``budget_reset_at`` is never in
the past.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

_DAY = 86_400
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": _DAY}
_PATTERN = re.compile(r"^([1-9][0-9]{0,5})(s|m|h|d|mo)$")
_EPOCH = datetime(1970, 1, 1)
# The largest window accepted: 100 years, so window ends stay representable.
_MAX_SECONDS = 100 * 366 * _DAY
_MAX_MONTHS = 1200


class DurationError(ValueError):
    """A ``budget_duration`` that budgetd does not understand."""


@dataclass(frozen=True, slots=True)
class Duration:
    """A parsed ``budget_duration``: ``count`` of ``unit`` (s, m, h, d, mo)."""

    count: int
    unit: str

    @property
    def text(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def months(self) -> int:
        """Calendar months per window, or 0 when the window is a fixed number of seconds."""
        if self.unit == "mo":
            return self.count
        if self.unit == "d" and self.count == 30:
            return 1
        return 0

    @property
    def seconds(self) -> int:
        return self.count * _UNIT_SECONDS[self.unit] if self.unit != "mo" else 0


@dataclass(frozen=True, slots=True)
class Window:
    """A budget window: spend admitted in ``[start, end)`` counts together.

    ``end`` is None for a budget that never resets; such a window starts at 0.
    """

    start: int
    end: int | None

    def contains(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)


ALL_TIME = Window(0, None)


def parse_duration(text: str | None, *, field: str = "budget_duration") -> Duration | None:
    """Parse ``1s``/``5m``/``1h``/``1d``/``30d``/``1mo``; empty or None means no reset."""
    if text is None or text == "":
        return None
    match = _PATTERN.match(text)
    if match is None:
        raise DurationError(
            f"{field} {text!r} is not a duration: use a positive whole number followed by "
            "s, m, h, d or mo (for example 1s, 30m, 1h, 1d, 30d, 1mo)"
        )
    duration = Duration(int(match.group(1)), match.group(2))
    if duration.months > _MAX_MONTHS or duration.seconds > _MAX_SECONDS:
        raise DurationError(f"{field} {text!r} is longer than 100 years")
    return duration


def window_at(duration: Duration | None, t: float, tz: tzinfo = UTC) -> Window:
    """The window of ``duration`` that contains the instant ``t`` (Unix seconds)."""
    if duration is None:
        return ALL_TIME
    second = math.floor(t)
    if not duration.months and duration.seconds <= _DAY:
        return _short_window(second, duration.seconds, tz)
    wall = datetime.fromtimestamp(second, tz).replace(tzinfo=None)
    if duration.months:
        start_wall, end_wall = _month_window(wall, duration.months)
    elif duration.unit == "d":
        start_wall, end_wall = _day_window(wall, duration.count)
    else:
        start_wall, end_wall = _clock_window(wall, duration.seconds)
    return Window(_instant(start_wall, tz), _instant(end_wall, tz))


class WindowCache:
    """:func:`window_at` for ``budget_duration`` texts, each window computed once.

    Windows of one duration partition time, so while ``t`` stays inside the window last
    computed for a (duration, zone) that window is the answer: the decision path then costs
    a dict lookup and two comparisons instead of time-zone arithmetic. One entry per
    distinct duration text and zone, so it stays as small as the set of durations in use.
    """

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[tuple[str, tzinfo], Window] = {}

    def at(self, duration: str, t: float, tz: tzinfo) -> Window:
        """The window of ``duration`` ("" = never resets) containing ``t``."""
        key = (duration, tz)
        window = self._last.get(key)
        if window is not None and window.start <= t and (window.end is None or t < window.end):
            return window
        window = window_at(parse_duration(duration), t, tz)
        self._last[key] = window
        return window


def _month_window(wall: datetime, months: int) -> tuple[datetime, datetime]:
    index = (wall.year - 1970) * 12 + (wall.month - 1)
    first = index - index % months
    return _month_start(first), _month_start(first + months)


def _month_start(index: int) -> datetime:
    year, month0 = divmod(index, 12)
    return datetime(1970 + year, month0 + 1, 1)


def _day_window(wall: datetime, days: int) -> tuple[datetime, datetime]:
    index = (wall.date() - _EPOCH.date()).days
    first = index - index % days
    start = _EPOCH + timedelta(days=first)
    return start, start + timedelta(days=days)


def _clock_window(wall: datetime, length: int) -> tuple[datetime, datetime]:
    if length > _DAY:
        elapsed = int((wall - _EPOCH).total_seconds())
        start = _EPOCH + timedelta(seconds=elapsed - elapsed % length)
        return start, start + timedelta(seconds=length)
    midnight = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    into_day = int((wall - midnight).total_seconds())
    start = midnight + timedelta(seconds=into_day - into_day % length)
    return start, min(start + timedelta(seconds=length), midnight + timedelta(days=1))


def _short_window(second: int, length: int, tz: tzinfo) -> Window:
    """A window of at most a day: a period of the wall clock, exact across clock changes.

    A boundary is an instant at which the wall clock shows a period's start. Converting a
    wall time back to an instant is ambiguous when the clocks go back (the hour is shown
    twice) and impossible when they jump forward, so the periods are computed on the fixed
    offset of ``second`` and only a clock change inside the period moves its ends: to the
    last boundary before the change, or the first one after it.
    """
    offset = _offset(second, tz)
    start, end = _fixed_window(second, length, offset)
    if _offset(start, tz) != offset:  # the clocks changed in (start, second]
        change = _change(start, second, tz)
        start = _fixed_window(change - 1, length, _offset(change - 1, tz))[0]
    if _offset(end, tz) != offset:  # the clocks change in (second, end]
        change = _change(second, end, tz)
        after = _fixed_window(change, length, _offset(change, tz))
        end = change if after[0] == change else after[1]
    return Window(start, end)


def _fixed_window(second: int, length: int, offset: int) -> tuple[int, int]:
    """The period of ``second`` as if the zone's UTC offset were ``offset`` throughout."""
    start, end = _clock_window(_EPOCH + timedelta(seconds=second + offset), length)
    return _seconds(start) - offset, _seconds(end) - offset


def _offset(second: int, tz: tzinfo) -> int:
    """The zone's UTC offset at an instant, in seconds."""
    offset = datetime.fromtimestamp(second, tz).utcoffset()
    return 0 if offset is None else int(offset.total_seconds())


def _change(before: int, after: int, tz: tzinfo) -> int:
    """The first second in ``(before, after]`` whose offset differs from ``before``'s."""
    offset = _offset(before, tz)
    while after - before > 1:
        middle = (before + after) // 2
        if _offset(middle, tz) == offset:
            before = middle
        else:
            after = middle
    return after


def _seconds(wall: datetime) -> int:
    """A naive datetime counted as seconds since 1970-01-01T00:00 on the same clock."""
    return int((wall - _EPOCH).total_seconds())


def _instant(wall: datetime, tz: tzinfo) -> int:
    return int(wall.replace(tzinfo=tz).timestamp())
