"""Rate limiters in process: the leaky buckets of :mod:`server.ratelimit` kept in a dict.

:class:`~server.storage.memory_counters.MemoryCounters` keeps its limiters here, and so does
:class:`~server.storage.postgres_counters.PostgresCounters` while Redis is down. Every method
runs to completion without awaiting, so each call is one atomic step in its event loop.

How one request's charges are decided (``lua/ratelimit.lua`` does the same, line for line):
each charge is checked in order against its limiter's level drained to now, a charge of a
limiter named earlier in the same request seeing that earlier charge; a charge that admits is
taken from the level, one that refuses is not. Only if none refused are the levels kept.
The retry hint is the longest wait of the refusing charges, so that by then each of them
(on its own, with no other traffic) would admit.

Also the checks every counter store applies to rate charges (:func:`check_rates`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.ratelimit import (
    MAX_CHARGE,
    MAX_PER_MINUTE,
    Bucket,
    admits,
    charge,
    drained,
    expiry_ms,
    retry_after_ms,
    state,
)
from server.rules import Enforcement
from server.storage.base import RateCharge, RateState

# Buckets reclaimed per call at most, like the counters' sweep.
_SWEEP_LIMIT = 256


def check_rates(rates: Sequence[RateCharge], *, at_reserve: bool) -> None:
    """Refuse what the limiters cannot count exactly, as ``check_nanos`` refuses amounts.

    ``per_minute`` in 1..MAX_PER_MINUTE; amounts of at most MAX_CHARGE either way, and not
    negative at reserve (only a settle's correction may refund). One limiter named twice in a
    request must carry the same limit both times.
    """
    per_minute: dict[str, int] = {}
    low = 0 if at_reserve else -MAX_CHARGE
    for rate in rates:
        limit = rate.limit
        if not 1 <= limit.per_minute <= MAX_PER_MINUTE:
            raise ValueError(
                f"per_minute of {limit.limiter_id} must be between 1 and {MAX_PER_MINUTE}, "
                f"got {limit.per_minute}"
            )
        if not low <= rate.amount <= MAX_CHARGE:
            raise ValueError(
                f"rate charge of {limit.limiter_id} must be between {low} and {MAX_CHARGE}, "
                f"got {rate.amount}"
            )
        if per_minute.setdefault(limit.limiter_id, limit.per_minute) != limit.per_minute:
            raise ValueError(f"{limit.limiter_id} is given two different limits in one call")


def now_ms(now: float) -> int:
    """The instant in whole milliseconds, as every limiter counts time."""
    if not math.isfinite(now):
        raise ValueError(f"instants must be finite, got {now!r}")
    return round(now * 1000)


@dataclass(frozen=True, slots=True)
class RateDecision:
    """What checking a request's rate charges found."""

    states: tuple[RateState, ...]  # per charge: after charging if admitted, else as read
    refused: int = -1  # the first charge that refused; -1 when all admitted (and were charged)
    retry_after: float = 0.0  # seconds until every refusing charge would admit

    @property
    def admitted(self) -> bool:
        return self.refused < 0


def plan(
    rates: Sequence[RateCharge], levels: Mapping[str, int], mode: Enforcement
) -> tuple[int, int, dict[str, int]]:
    """Decide a request's charges against ``levels`` (limiter id -> level drained to now).

    Returns the index of the first refusing charge (-1: none), the longest wait in ms of the
    refusing ones, and the levels after taking every admitted charge.
    """
    after = dict(levels)
    refused, retry = -1, 0
    for index, rate in enumerate(rates):
        limit, level = rate.limit, after[rate.limit.limiter_id]
        if admits(limit.unit, limit.per_minute, level, rate.amount, mode):
            after[limit.limiter_id] = charge(level, rate.amount)
        else:
            refused = index if refused < 0 else refused
            retry = max(
                retry, retry_after_ms(limit.unit, limit.per_minute, level, rate.amount, mode)
            )
    return refused, retry, after


@dataclass(frozen=True, slots=True)
class _Limiter:
    bucket: Bucket
    expires_ms: int  # when it has drained to 0: from then on it is as if absent


class RateLimiters:
    """Leaky buckets per (team, limiter id), in one process."""

    def __init__(self) -> None:
        self._limiters: dict[tuple[str, str], _Limiter] = {}
        # Min-heap of (expires_ms, team, limiter id) to reclaim drained buckets; entries of
        # buckets charged again since are stale and skipped.
        self._expiry: list[tuple[int, str, str]] = []
        # Corrections applied by correct_once: (team, request id) -> until (ms), and its heap.
        self._done: dict[tuple[str, str], int] = {}
        self._done_expiry: list[tuple[int, str, str]] = []

    def reserve(
        self, team_id: str, rates: Sequence[RateCharge], now: float, mode: Enforcement
    ) -> RateDecision:
        """Check every charge and, only if all admit, take each from its limiter."""
        if not rates:
            return RateDecision(())
        at = now_ms(now)
        self.sweep(at)
        read = self._levels(team_id, rates, at)
        refused, retry, after = plan(rates, read, mode)
        if refused >= 0:
            states = tuple(state(r.limit.per_minute, read[r.limit.limiter_id]) for r in rates)
            return RateDecision(states, refused, retry / 1000)
        self._store(team_id, rates, after, at)
        return RateDecision(
            tuple(state(r.limit.per_minute, after[r.limit.limiter_id]) for r in rates)
        )

    def correct(self, team_id: str, rates: Sequence[RateCharge], now: float) -> None:
        """Apply settle-time corrections (negative ones refund, down to an empty bucket)."""
        if not rates:
            return
        at = now_ms(now)
        self.sweep(at)
        levels = self._levels(team_id, rates, at)
        for rate in rates:
            levels[rate.limit.limiter_id] = charge(levels[rate.limit.limiter_id], rate.amount)
        self._store(team_id, rates, levels, at)

    def correct_once(
        self,
        team_id: str,
        request_id: str,
        rates: Sequence[RateCharge],
        now: float,
        dedupe_seconds: int,
    ) -> bool:
        """:meth:`correct`, unless ``request_id`` was corrected in the last ``dedupe_seconds``.

        For a store with no settle dedupe of its own (PostgresCounters); False on a repeat.
        """
        if not rates:
            return True
        at = now_ms(now)
        self.sweep(at)
        key = (team_id, request_id)
        if self._done.get(key, at) > at:
            return False
        until = at + dedupe_seconds * 1000
        self._done[key] = until
        heapq.heappush(self._done_expiry, (until, team_id, request_id))
        self.correct(team_id, rates, now)
        return True

    def sweep(self, at_ms: int) -> None:
        """Forget drained buckets and old dedupe marks (a bounded number per call)."""
        for _ in range(_SWEEP_LIMIT):
            if not self._done_expiry or self._done_expiry[0][0] > at_ms:
                break
            _, team_id, request_id = heapq.heappop(self._done_expiry)
            if self._done.get((team_id, request_id), at_ms + 1) <= at_ms:
                del self._done[(team_id, request_id)]
        for _ in range(_SWEEP_LIMIT):
            if not self._expiry or self._expiry[0][0] > at_ms:
                break
            _, team_id, limiter_id = heapq.heappop(self._expiry)
            limiter = self._limiters.get((team_id, limiter_id))
            if limiter is not None and limiter.expires_ms <= at_ms:
                del self._limiters[(team_id, limiter_id)]

    def __len__(self) -> int:
        """Buckets and dedupe marks held (drained or old ones linger until swept)."""
        return len(self._limiters) + len(self._done)

    def _levels(self, team_id: str, rates: Sequence[RateCharge], at_ms: int) -> dict[str, int]:
        levels: dict[str, int] = {}
        for rate in rates:
            limiter_id = rate.limit.limiter_id
            if limiter_id not in levels:
                limiter = self._limiters.get((team_id, limiter_id))
                levels[limiter_id] = (
                    0 if limiter is None else drained(limiter.bucket, rate.limit.per_minute, at_ms)
                )
        return levels

    def _store(
        self, team_id: str, rates: Sequence[RateCharge], levels: Mapping[str, int], at_ms: int
    ) -> None:
        per_minute = {rate.limit.limiter_id: rate.limit.per_minute for rate in rates}
        for limiter_id, level in levels.items():
            key = (team_id, limiter_id)
            old = self._limiters.get(key)
            if level <= 0:
                self._limiters.pop(key, None)  # an empty bucket is as good as none
                continue
            # A clock that stepped back drained nothing: the level is still as of the later
            # instant, which is kept so that time is not drained twice.
            as_of = at_ms if old is None else max(old.bucket.at_ms, at_ms)
            expires = as_of + expiry_ms(per_minute[limiter_id], level)
            self._limiters[key] = _Limiter(Bucket(level, as_of), expires)
            heapq.heappush(self._expiry, (expires, team_id, limiter_id))
