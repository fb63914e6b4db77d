"""The rate-limit rule (server/ratelimit.py), pure: leaky buckets in integer unit-milliseconds.

Also its two twins: the in-process decision of a request's charges (memory_limiters.plan) and
the Lua one (lua/ratelimit.lua), run in a real Redis over many cases, which must agree with
Python to the unit, at the largest values too.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from fractions import Fraction
from importlib.resources import files

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from server.ratelimit import (
    MAX_CHARGE,
    MAX_LEVEL,
    MAX_PER_MINUTE,
    WINDOW_MS,
    Bucket,
    admits,
    charge,
    drained,
    expiry_ms,
    retry_after_ms,
    state,
)
from server.rules import Enforcement
from server.storage.base import RateCharge, RateLimit, RateState, RateUnit, ScopeKind
from server.storage.memory_limiters import RateLimiters, check_rates, plan

RPM, TPM = RateUnit.REQUESTS, RateUnit.TOKENS
CROSS, NEVER = Enforcement.CROSS_ONCE, Enforcement.NEVER_EXCEED
T0 = 1_700_000_000_000  # an instant, in ms


class Limiter:
    """One limiter driven through the pure functions, as a store would."""

    def __init__(self, unit: RateUnit, per_minute: int, mode: Enforcement = CROSS) -> None:
        self.unit, self.per_minute, self.mode = unit, per_minute, mode
        self.bucket = Bucket(0, T0)

    def level(self, now_ms: int) -> int:
        return drained(self.bucket, self.per_minute, now_ms)

    def take(self, now_ms: int, amount: int = 1) -> int | None:
        """None when admitted (and charged), else the retry hint in ms."""
        level = self.level(now_ms)
        if not admits(self.unit, self.per_minute, level, amount, self.mode):
            return retry_after_ms(self.unit, self.per_minute, level, amount, self.mode)
        self.bucket = Bucket(charge(level, amount), now_ms)
        return None

    def correct(self, now_ms: int, amount: int) -> None:
        self.bucket = Bucket(charge(self.level(now_ms), amount), now_ms)


def test_rpm_3_admits_3_at_once_then_asks_to_retry_in_20_s() -> None:
    limiter = Limiter(RPM, 3)
    assert [limiter.take(T0) for _ in range(5)] == [None, None, None, 20_000, 20_000]
    assert state(3, limiter.level(T0)) == RateState(per_minute=3, remaining=0, reset_after=60.0)


def test_rpm_drains_one_request_per_sixtieth_of_the_limit() -> None:
    limiter = Limiter(RPM, 3)
    for _ in range(3):
        limiter.take(T0)

    assert limiter.take(T0 + 19_999) == 1  # one millisecond short
    assert limiter.take(T0 + 20_000) is None
    assert limiter.take(T0 + 20_000) == 20_000
    assert state(3, limiter.level(T0 + 80_000)) == RateState(3, 3, 0.0)  # fully drained
    assert [limiter.take(T0 + 80_000) for _ in range(4)] == [None, None, None, 20_000]


def test_tpm_cross_once_lets_the_crossing_request_through() -> None:
    limiter = Limiter(TPM, 100, CROSS)
    assert limiter.take(T0, 80) is None
    assert limiter.take(T0, 80) is None  # 80 < 100: admitted, and now over
    # 160 of 100: the next waits until the level is below the capacity again.
    assert limiter.take(T0, 1) == 36_001
    assert limiter.take(T0 + 36_001, 1) is None


def test_tpm_never_exceed_admits_only_an_estimate_that_fits() -> None:
    limiter = Limiter(TPM, 100, NEVER)
    assert limiter.take(T0, 80) is None
    assert limiter.take(T0, 80) == 36_000  # 80 + 80 - 100 = 60 tokens to drain
    assert limiter.take(T0, 20) is None
    assert limiter.take(T0 + 36_000, 60) is None


def test_a_negative_correction_refunds_down_to_an_empty_bucket() -> None:
    limiter = Limiter(TPM, 1000)
    limiter.take(T0, 300)
    limiter.correct(T0, -100)
    assert state(1000, limiter.level(T0)).remaining == 800
    limiter.correct(T0, -(10**6))
    assert limiter.level(T0) == 0
    assert state(1000, 0) == RateState(1000, 1000, 0.0)
    assert expiry_ms(1000, 0) == 1


def test_a_clock_that_steps_back_drains_nothing() -> None:
    bucket = Bucket(120_000, T0)
    assert drained(bucket, 1, T0 - 5_000) == 120_000
    assert drained(bucket, 1, T0 + 5_000) == 115_000


def test_state_reports_whole_units_left_and_seconds_until_empty() -> None:
    assert state(10, 5 * WINDOW_MS + 1) == RateState(10, 4, 30.001)
    assert state(10, 12 * WINDOW_MS) == RateState(10, 0, 72.0)
    assert expiry_ms(10, 5 * WINDOW_MS + 1) == 30_002


def test_the_largest_limits_and_charges_are_exact() -> None:
    limiter = Limiter(TPM, MAX_PER_MINUTE, NEVER)
    assert limiter.take(T0, MAX_CHARGE - 1) is None
    assert state(MAX_PER_MINUTE, limiter.level(T0)).remaining == 1
    assert limiter.take(T0, 2) == 1  # one token more than fits: 60_000 unit-ms at 1e9 per ms
    assert limiter.take(T0, 1) is None
    assert state(MAX_PER_MINUTE, limiter.level(T0)) == RateState(MAX_PER_MINUTE, 0, 60.0)


def test_levels_are_capped_so_the_lua_twin_stays_exact() -> None:
    level = 0
    for _ in range(100):
        level = charge(level, MAX_CHARGE)
    assert level == MAX_LEVEL < 2**53 - MAX_CHARGE * WINDOW_MS
    assert charge(MAX_LEVEL, -1) == MAX_LEVEL - WINDOW_MS


def test_plan_is_all_or_nothing_and_counts_a_limiter_named_twice() -> None:
    key = RateLimit(ScopeKind.KEY, "k", RPM, 2)
    member = RateLimit(ScopeKind.MEMBER, "t", RPM, 1, user_id="u")
    levels = {key.limiter_id: 0, member.limiter_id: WINDOW_MS}

    refused, retry, _ = plan([RateCharge(key, 1), RateCharge(member, 1)], levels, CROSS)
    assert (refused, retry) == (1, 60_000)
    refused, _, after = plan([RateCharge(key, 1), RateCharge(key, 1)], levels, CROSS)
    assert (refused, after[key.limiter_id]) == (-1, 2 * WINDOW_MS)
    refused, _, _ = plan([RateCharge(key, 1)] * 3, levels, CROSS)
    assert refused == 2


def test_rate_limiters_forget_drained_buckets() -> None:
    limiters = RateLimiters()
    limit = RateLimit(ScopeKind.KEY, "k", RPM, 60)
    now = T0 / 1000
    assert limiters.reserve("t", [RateCharge(limit, 1)], now, CROSS).admitted
    assert limiters.correct_once("t", "q1", [RateCharge(limit, 0)], now, 5)
    assert len(limiters) == 2  # the bucket and the dedupe mark
    assert not limiters.correct_once("t", "q1", [RateCharge(limit, 0)], now + 4.999, 5)
    assert len(limiters) == 1  # the bucket drained after 1 s: gone
    limiters.sweep(T0 + 5_000)
    assert len(limiters) == 0


@pytest.mark.parametrize(
    ("per_minute", "amount", "at_reserve"),
    [(0, 1, True), (MAX_PER_MINUTE + 1, 1, True), (1, -1, True), (1, MAX_CHARGE + 1, False)],
)
def test_out_of_range_charges_are_refused(per_minute: int, amount: int, at_reserve: bool) -> None:
    limit = RateLimit(ScopeKind.KEY, "k", TPM, per_minute)
    with pytest.raises(ValueError):
        check_rates([RateCharge(limit, amount)], at_reserve=at_reserve)
    check_rates([RateCharge(RateLimit(ScopeKind.KEY, "k", TPM, 1), -MAX_CHARGE)], at_reserve=False)


def test_one_limiter_with_two_limits_in_a_call_is_refused() -> None:
    charges = [RateCharge(RateLimit(ScopeKind.KEY, "k", RPM, n), 1) for n in (1, 2)]
    with pytest.raises(ValueError, match="two different limits"):
        check_rates(charges, at_reserve=True)


# -- against a reference model: a bucket of Fraction units draining per_minute / 60 s --------


class Reference:
    """The textbook leaky bucket in exact rationals, in units (not unit-ms)."""

    def __init__(self, unit: RateUnit, per_minute: int, mode: Enforcement) -> None:
        self.unit, self.per_minute, self.mode = unit, per_minute, mode
        self.units, self.at = Fraction(0), T0

    def _drain(self, now: int) -> None:
        elapsed = max(0, now - self.at)
        self.units = max(Fraction(0), self.units - Fraction(self.per_minute * elapsed, WINDOW_MS))
        self.at = max(self.at, now)

    def _fits(self, amount: int) -> bool:
        if self.unit is RPM or self.mode is NEVER:
            return self.units + max(amount, 0) <= self.per_minute
        return self.units < self.per_minute

    def take(self, now: int, amount: int) -> bool:
        self._drain(now)
        if not self._fits(amount):
            return False
        self.units = min(Fraction(MAX_LEVEL, WINDOW_MS), self.units + amount)
        return True


@given(
    unit=st.sampled_from(RateUnit),
    mode=st.sampled_from(Enforcement),
    per_minute=st.integers(1, 1000),
    steps=st.lists(st.tuples(st.integers(0, 90_000), st.integers(0, 400)), max_size=40),
)
def test_admits_exactly_as_a_rational_leaky_bucket(
    unit: RateUnit, mode: Enforcement, per_minute: int, steps: list[tuple[int, int]]
) -> None:
    reference, limiter = Reference(unit, per_minute, mode), Limiter(unit, per_minute, mode)
    now = T0
    for gap, amount in steps:
        now += gap
        taken = amount if unit is TPM else 1
        hint = limiter.take(now, taken)
        assert (hint is None) == reference.take(now, taken)
        fits_at_all = unit is RPM or mode is CROSS or taken <= per_minute
        if hint is not None and fits_at_all:
            # The hint is the first millisecond at which the same request is admitted.
            bucket = Bucket(limiter.level(now), now)
            before = drained(bucket, per_minute, now + hint - 1)
            assert not admits(unit, per_minute, before, taken, mode)
            assert admits(unit, per_minute, drained(bucket, per_minute, now + hint), taken, mode)


# -- the Lua twin, in a real Redis ---------------------------------------------------------------

_LUA_DRIVER = """
local out = {}
for i = 1, #ARGV, 6 do
  local unit, mode = ARGV[i], ARGV[i + 1]
  local per_minute, level = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local amount, elapsed = tonumber(ARGV[i + 4]), tonumber(ARGV[i + 5])
  local d = rl_drained(level, 1000, per_minute, 1000 + elapsed)
  local ok = rl_admits(unit, per_minute, d, amount, mode)
  out[#out + 1] = string.format('%.0f', d)
  out[#out + 1] = ok and 1 or 0
  local retry = ok and 0 or rl_retry_after_ms(unit, per_minute, d, amount, mode)
  out[#out + 1] = string.format('%.0f', retry)
  out[#out + 1] = string.format('%.0f', rl_charge(d, amount))
  out[#out + 1] = string.format('%.0f', rl_expiry_ms(per_minute, d))
end
return out
"""


def _python_twin(
    unit: str, mode: str, per_minute: int, level: int, amount: int, elapsed: int
) -> list[int]:
    u, m = RateUnit(unit), Enforcement(mode)
    d = drained(Bucket(level, 1000), per_minute, 1000 + elapsed)
    ok = admits(u, per_minute, d, amount, m)
    retry = 0 if ok else retry_after_ms(u, per_minute, d, amount, m)
    return [d, int(ok), retry, charge(d, amount), expiry_ms(per_minute, d)]


def _cases(count: int) -> list[tuple[str, str, int, int, int, int]]:
    rng = random.Random(20240613)
    per_minutes = [1, 2, 3, 7, 59, 60, 61, 999_983, MAX_PER_MINUTE - 1, MAX_PER_MINUTE]
    levels = [0, 1, WINDOW_MS - 1, WINDOW_MS, MAX_LEVEL - 1, MAX_LEVEL, MAX_PER_MINUTE * WINDOW_MS]
    amounts = [0, 1, -1, MAX_CHARGE, -MAX_CHARGE, MAX_CHARGE - 1]
    elapsed = [0, 1, 59_999, 60_000, 10**12, -5]
    cases = []
    for _ in range(count):
        per_minute = (
            rng.choice(per_minutes) if rng.random() < 0.5 else rng.randint(1, MAX_PER_MINUTE)
        )
        level = rng.choice(levels) if rng.random() < 0.5 else rng.randint(0, MAX_LEVEL)
        amount = rng.choice(amounts) if rng.random() < 0.5 else rng.randint(-MAX_CHARGE, MAX_CHARGE)
        gap = rng.choice(elapsed) if rng.random() < 0.5 else rng.randint(0, 10**8)
        unit, mode = rng.choice(["rpm", "tpm"]), rng.choice(["cross_once", "never_exceed"])
        cases.append((unit, mode, per_minute, level, amount, gap))
    return cases


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_the_lua_twin_agrees_with_python_to_the_unit(raw_redis: Redis) -> None:
    lua = files("server.storage") / "lua"
    source = "\n".join(
        [
            f"local WINDOW_MS = {WINDOW_MS}",
            f"local MAX_LEVEL = {MAX_LEVEL}",
            (lua / "ratelimit.lua").read_text(encoding="utf-8"),
            _LUA_DRIVER,
        ]
    )
    cases = _cases(3000)
    for start in range(0, len(cases), 500):
        batch = cases[start : start + 500]
        args = [str(value) for case in batch for value in case]
        reply = await raw_redis.eval(source, 0, *args)
        got = [int(value) for value in reply]
        for index, case in enumerate(batch):
            assert got[5 * index : 5 * index + 5] == _python_twin(*case), case
