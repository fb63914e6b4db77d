"""Clocks: the decision logic never reads the wall clock itself; it is handed one."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time as Unix seconds (float)."""

    def now(self) -> float: ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()


class FakeClock:
    """A clock the tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def set(self, value: float) -> None:
        self._now = value

    def advance(self, seconds: float) -> None:
        self._now += seconds
