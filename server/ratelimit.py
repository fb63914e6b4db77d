"""Per-minute rate limits (rpm, tpm) as leaky buckets in exact integers — pure functions.

A limiter of ``L`` per minute is a bucket of capacity ``L`` that drains continuously at
``L`` per minute (the GCRA / leaky-bucket form of "L per minute"): ``L`` requests at once are
admitted, and then one more every ``60/L`` seconds. Unlike a fixed minute window, there is
no boundary where twice the limit gets through, and unlike a sliding log it is one number.

Integers only, so Python and the Redis script (``lua/ratelimit.lua``) agree to the unit:
the level is kept in *unit-milliseconds* (one request or token = ``WINDOW_MS`` of level),
and drains by ``L`` per millisecond. Values stay below 2^53, exact in Lua's doubles, for
limits up to :data:`MAX_PER_MINUTE` and charges up to :data:`MAX_CHARGE`: a level is never
stored above :data:`MAX_LEVEL` (2^52), so a level plus one charge is still exact.

The rule, per unit:

* requests: admit if ``level + WINDOW_MS <= capacity`` (the request fits);
* tokens: admit while the bucket is not full (``level < capacity``) — the estimate is charged
  at check time and corrected at settle time, so the request that crosses completes
  (LiteLLM's tpm behaviour); with ``never_exceed`` the estimate must fit, like a budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from server.rules import Enforcement
from server.storage.base import RateState, RateUnit

WINDOW_MS: Final = 60_000
MAX_PER_MINUTE: Final = 10**9
MAX_CHARGE: Final = 10**9
# The highest level a bucket keeps: 2^52 unit-ms, so a level plus any charge (at most
# MAX_CHARGE * WINDOW_MS < 2^46) stays below 2^53. That is a debt of 75 billion units (75
# minutes to drain even at MAX_PER_MINUTE), at least 37 times what admitted requests can
# leave (capacity plus one charge): only a run of huge positive token corrections reaches
# it, and then the limiter keeps refusing, only for a bounded time.
MAX_LEVEL: Final = 2**52


@dataclass(frozen=True, slots=True)
class Bucket:
    """A limiter's stored state: its level (unit-ms) as of ``at_ms``."""

    level: int = 0
    at_ms: int = 0


def drained(bucket: Bucket, per_minute: int, now_ms: int) -> int:
    """The bucket's level at ``now_ms`` (never below 0; a clock step back drains nothing)."""
    elapsed = max(0, now_ms - bucket.at_ms)
    return max(0, bucket.level - per_minute * elapsed)


def admits(unit: RateUnit, per_minute: int, level: int, amount: int, mode: Enforcement) -> bool:
    """Does a limiter at ``level`` admit a request taking ``amount`` units?"""
    capacity = per_minute * WINDOW_MS
    if unit is RateUnit.REQUESTS or mode is Enforcement.NEVER_EXCEED:
        return level + max(amount, 0) * WINDOW_MS <= capacity
    return level < capacity


def retry_after_ms(
    unit: RateUnit, per_minute: int, level: int, amount: int, mode: Enforcement
) -> int:
    """Milliseconds until a denied request would be admitted (at least 1)."""
    capacity = per_minute * WINDOW_MS
    if unit is RateUnit.REQUESTS or mode is Enforcement.NEVER_EXCEED:
        excess = level + max(amount, 0) * WINDOW_MS - capacity
    else:
        excess = level - capacity + 1
    return max(1, -(-excess // per_minute))  # ceil


def charge(level: int, amount: int) -> int:
    """The level after taking ``amount`` units (a negative correction refunds, down to 0).

    Never above :data:`MAX_LEVEL`, so the Lua twin stays exact.
    """
    return min(MAX_LEVEL, max(0, level + amount * WINDOW_MS))


def state(per_minute: int, level: int) -> RateState:
    """What is left this minute (whole units) and seconds until the bucket is empty."""
    capacity = per_minute * WINDOW_MS
    remaining = max(0, capacity - level) // WINDOW_MS
    reset_ms = -(-level // per_minute)
    return RateState(per_minute=per_minute, remaining=remaining, reset_after=reset_ms / 1000)


def expiry_ms(per_minute: int, level: int) -> int:
    """How long a stored bucket matters: until it has drained to 0 (then it is as new)."""
    return -(-level // per_minute) + 1
