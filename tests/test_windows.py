"""Window math: every duration form, month ends, leap days; the window is [start, end)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.windows import ALL_TIME, DurationError, WindowCache, parse_duration, window_at


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc, arg-type]


def iso(t: int | None) -> str:
    assert t is not None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


CASES = [
    # duration, instant, expected start, expected end (the reset instant)
    ("1s", at(2024, 6, 13, 22, 48, 36) + 0.594, "2024-06-13T22:48:36", "2024-06-13T22:48:37"),
    ("1m", at(2024, 6, 13, 22, 48, 36), "2024-06-13T22:48:00", "2024-06-13T22:49:00"),
    ("1h", at(2024, 6, 13, 22, 48, 36), "2024-06-13T22:00:00", "2024-06-13T23:00:00"),
    ("1d", at(2024, 6, 13, 22, 48, 36), "2024-06-13T00:00:00", "2024-06-14T00:00:00"),
    ("30d", at(2024, 6, 13, 22, 48, 36), "2024-06-01T00:00:00", "2024-07-01T00:00:00"),
    ("1mo", at(2024, 6, 13, 22, 48, 36), "2024-06-01T00:00:00", "2024-07-01T00:00:00"),
    # month ends and leap days
    ("1d", at(2024, 2, 29, 23, 59, 59), "2024-02-29T00:00:00", "2024-03-01T00:00:00"),
    ("1mo", at(2024, 2, 29, 12), "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
    ("1mo", at(2023, 2, 28, 23, 59, 59), "2023-02-01T00:00:00", "2023-03-01T00:00:00"),
    ("30d", at(2024, 1, 31, 23, 59, 59), "2024-01-01T00:00:00", "2024-02-01T00:00:00"),
    ("1mo", at(2024, 12, 31, 23, 59, 59), "2024-12-01T00:00:00", "2025-01-01T00:00:00"),
    ("1h", at(2024, 12, 31, 23, 59, 59), "2024-12-31T23:00:00", "2025-01-01T00:00:00"),
    ("1s", at(2024, 12, 31, 23, 59, 59), "2024-12-31T23:59:59", "2025-01-01T00:00:00"),
    # other values by the documented rule
    ("15s", at(2024, 6, 13, 22, 48, 44), "2024-06-13T22:48:30", "2024-06-13T22:48:45"),
    ("5m", at(2024, 6, 13, 22, 48, 36), "2024-06-13T22:45:00", "2024-06-13T22:50:00"),
    ("7h", at(2024, 6, 13, 22, 48, 36), "2024-06-13T21:00:00", "2024-06-14T00:00:00"),
    ("6h", at(2024, 6, 13, 22, 48, 36), "2024-06-13T18:00:00", "2024-06-14T00:00:00"),
    ("48h", at(2024, 6, 13, 22, 48, 36), "2024-06-12T00:00:00", "2024-06-14T00:00:00"),
    ("7d", at(2024, 6, 13, 22, 48, 36), "2024-06-13T00:00:00", "2024-06-20T00:00:00"),
    ("3mo", at(2024, 6, 13, 22, 48, 36), "2024-04-01T00:00:00", "2024-07-01T00:00:00"),
    ("12mo", at(2024, 6, 13, 22, 48, 36), "2024-01-01T00:00:00", "2025-01-01T00:00:00"),
    ("2mo", at(2024, 2, 29, 1), "2024-01-01T00:00:00", "2024-03-01T00:00:00"),
]


@pytest.mark.parametrize(("text", "t", "start", "end"), CASES)
def test_window_of_every_duration_form(text: str, t: float, start: str, end: str) -> None:
    window = window_at(parse_duration(text), t)
    assert (iso(window.start), iso(window.end)) == (start, end)


def test_window_boundary_instant_belongs_to_the_next_window() -> None:
    reset = at(2024, 3, 1)
    before = window_at(parse_duration("1d"), reset - 0.001)
    after = window_at(parse_duration("1d"), reset)
    assert before.end == reset == after.start
    assert not before.contains(reset)
    assert after.contains(reset)


def test_no_duration_is_one_window_that_never_resets() -> None:
    assert parse_duration("") is None
    assert window_at(None, at(2024, 1, 1)) == ALL_TIME


@pytest.mark.parametrize("bad", ["1x", "0d", "-1h", "d", "1.5h", "1 d", "01d", "1D", "mo"])
def test_unknown_durations_are_rejected_with_a_message(bad: str) -> None:
    with pytest.raises(DurationError, match="budget_duration"):
        parse_duration(bad)


def test_daily_window_follows_the_configured_time_zone() -> None:
    tz = ZoneInfo("America/New_York")
    window = window_at(parse_duration("1d"), at(2024, 6, 14, 3, 0, 0), tz)
    # 03:00 UTC is 23:00 the previous evening in New York (EDT, UTC-4).
    assert (iso(window.start), iso(window.end)) == ("2024-06-13T04:00:00", "2024-06-14T04:00:00")


@given(
    text=st.sampled_from(["1s", "1m", "1h", "1d", "30d", "1mo", "7h", "13s", "3d", "3mo"]),
    t=st.floats(min_value=0, max_value=4_000_000_000),
)
def test_every_instant_is_in_exactly_one_window(text: str, t: float) -> None:
    duration = parse_duration(text)
    window = window_at(duration, t)
    assert window.contains(t)
    assert window.end is not None
    # The next window starts exactly where this one ends: no gaps, no overlaps.
    assert window_at(duration, window.end).start == window.end
    assert window_at(duration, window.start).start == window.start


@given(
    st.lists(st.integers(min_value=1_600_000_000, max_value=1_800_000_000), max_size=40),
    st.sampled_from(["", "1s", "1m", "1h", "1d", "7d", "30d", "1mo", "90m"]),
    st.sampled_from(["UTC", "Europe/Berlin", "America/New_York"]),
)
def test_the_window_cache_answers_what_window_at_does(
    instants: list[int], duration: str, zone: str
) -> None:
    cache, tz = WindowCache(), ZoneInfo(zone)
    # Unsorted instants jump back and forth across boundaries, including DST changes.
    for t in [*instants, *sorted(instants)]:
        for instant in (t, t + 0.5):
            assert cache.at(duration, instant, tz) == window_at(
                parse_duration(duration), instant, tz
            )
