"""Windows at the edge (DESIGN §3 "Windows", invariant 3 of §10).

* A request admitted in one window and settled in the next is charged to the window it was
  admitted in, exactly once: in the ledger and in the counters, with its hold released,
  also when RecordSpend is retried after the boundary and when the counters were lost.
* ``budget_reset_at`` is the instant spend really resets, to the second, for 1s, 1m, 1h,
  1d and 1mo: spend admitted at the last representable instant before it still counts, and
  at the instant itself spend is 0.

* Where a configured time zone changes its clocks (daylight saving time), every instant is
  still in exactly one window and ``budget_reset_at`` is never in the past: in the hour
  that happens twice when the clocks go back, a ``1m`` budget resets every minute and does
  not see the spend of the same wall-clock minute an hour earlier.

They run on the injected clock on both backends; the reset is then checked once more on the
real clock against a real ``budgetd serve`` process.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import (
    BACKENDS,
    SEED_INSTANT,
    Backend,
    backend_urls,
    make_settings,
    nanos,
    open_backend,
)
from replicas import create_team_and_key, start_replicas
from server.admin import NewKey, NewTeam
from server.authority import Authority, CheckRequest, SpendRequest
from server.config import Settings
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.identity import ReservationCodec
from server.rules import Enforcement
from server.scopes import team_scope
from server.storage.base import CounterState, ScopeBudget, ScopeKind
from server.windows import parse_duration, window_at


def at(*parts: int) -> float:
    """A UTC instant as Unix seconds."""
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc, arg-type]


# The seed's instant is 2024-06-13T22:48:36Z; the minute it falls in ends at 22:49:00.
MINUTE_END = at(2024, 6, 13, 22, 49)
JUST_BEFORE = math.nextafter(MINUTE_END, -math.inf)  # the last instant of the old minute


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    """The backend's name and settings (a sync fixture, so it may start the services)."""
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, **urls, reservation_ttl=60.0)


@pytest.fixture
async def backend(backend_settings: tuple[str, Settings]) -> AsyncIterator[Backend]:
    async with open_backend(*backend_settings) as b:
        yield b


async def team_and_key(b: Backend, duration: str, max_budget: float = 1.0) -> tuple[str, str]:
    team = await b.admin.create_team(
        NewTeam(team_alias="edge", max_budget=max_budget, budget_duration=duration)
    )
    issued = await b.admin.issue_key(NewKey(team_id=team.team.team_id))
    return team.team.team_id, issued.plaintext


async def team_window(b: Backend, team_id: str, t: float) -> ScopeBudget:
    """The team's budget scope in the window that contains ``t``."""
    team = await b.records.get_team(team_id)
    assert team is not None
    return team_scope(team, t, UTC)


async def charged(b: Backend, team_id: str, t: float) -> tuple[int, CounterState | None]:
    """(ledger sum, counter) of the team's window containing ``t``."""
    scope = await team_window(b, team_id, t)
    ledger = await b.records.sum_spend(
        ScopeKind.TEAM, team_id, scope.window.start, scope.window.end
    )
    (counter,) = await b.counters.read(team_id, [scope], b.clock.now())
    return ledger, counter


async def admit(b: Backend, key: str, estimate: float | None = 0.5) -> str:
    """CheckBudget (holding ``estimate``) at the clock's instant; the reservation id."""
    decision = await b.authority.check(CheckRequest(api_key=key, estimated_cost=estimate))
    assert decision.allowed, decision.message
    return decision.reservation_id


async def assert_new_window_untouched(b: Backend, team_id: str, key: str) -> None:
    """At the clock's instant (a later window) spend is 0: in answers, ledger and counter."""
    fresh = await b.authority.check(CheckRequest(api_key=key))  # creates the counter
    assert fresh.spend_nanos == 0 and fresh.remaining_nanos == nanos(1.0)
    assert (await b.admin.get_team(team_id)).spend_nanos == 0
    assert await charged(b, team_id, b.clock.now()) == (0, CounterState(0, 0))


async def settle(b: Backend, request_id: str, reservation_id: str, cost: float) -> bool:
    """RecordSpend at the clock's instant; whether it was a duplicate."""
    result = await b.authority.record(
        SpendRequest(request_id=request_id, reservation_id=reservation_id, cost=cost)
    )
    assert result.cost_nanos == nanos(cost)
    return result.duplicate


# --- settled in the next window -----------------------------------------------------------


async def test_a_request_settled_after_the_reset_is_charged_once_to_the_window_it_was_admitted_in(
    backend: Backend,
) -> None:
    team_id, key = await team_and_key(backend, "1m")
    backend.clock.set(JUST_BEFORE)
    reservation = await admit(backend, key, estimate=0.5)
    assert await charged(backend, team_id, JUST_BEFORE) == (0, CounterState(0, nanos(0.5)))

    backend.clock.set(MINUTE_END + 0.25)
    assert not await settle(backend, "late", reservation, 0.25)
    # Retries after the boundary, in the next minute and much later, change nothing.
    assert await settle(backend, "late", reservation, 0.25)
    backend.clock.set(MINUTE_END + 3 * 3600)
    assert await settle(backend, "late", reservation, 0.25)

    # The old minute: charged once, hold released. The new minute: untouched.
    old = await charged(backend, team_id, JUST_BEFORE)
    assert old == (nanos(0.25), CounterState(nanos(0.25), 0))
    backend.clock.set(MINUTE_END + 0.5)
    await assert_new_window_untouched(backend, team_id, key)


async def test_a_spend_settled_before_the_reset_and_retried_after_it_counts_once(
    backend: Backend,
) -> None:
    team_id, key = await team_and_key(backend, "1m")
    backend.clock.set(MINUTE_END - 0.5)
    reservation = await admit(backend, key)
    backend.clock.set(JUST_BEFORE)
    assert not await settle(backend, "edge", reservation, 0.125)
    backend.clock.set(MINUTE_END)
    assert await settle(backend, "edge", reservation, 0.125)

    old = await charged(backend, team_id, JUST_BEFORE)
    assert old == (nanos(0.125), CounterState(nanos(0.125), 0))
    await assert_new_window_untouched(backend, team_id, key)


async def test_a_late_settlement_after_the_counters_were_lost_is_charged_once_to_its_window(
    backend: Backend,
) -> None:
    team_id, key = await team_and_key(backend, "1m")
    backend.clock.set(MINUTE_END - 0.5)
    await settle(backend, "before", await admit(backend, key), 0.5)
    backend.clock.set(JUST_BEFORE)
    reservation = await admit(backend, key, estimate=0.25)
    await backend.lose_counters()

    backend.clock.set(MINUTE_END + 1)
    assert not await settle(backend, "late", reservation, 0.125)
    assert await settle(backend, "late", reservation, 0.125)
    # Rebuilt from the ledger by setting, then settled once; the lost hold is not resurrected.
    old = await charged(backend, team_id, JUST_BEFORE)
    assert old == (nanos(0.625), CounterState(nanos(0.625), 0))
    await assert_new_window_untouched(backend, team_id, key)


# --- budget_reset_at is the reset instant -------------------------------------------------

RESETS = [
    # duration, the reset of the window holding the seed's instant (22:48:36Z), the next one
    ("1s", at(2024, 6, 13, 22, 48, 37), at(2024, 6, 13, 22, 48, 38)),
    ("1m", at(2024, 6, 13, 22, 49), at(2024, 6, 13, 22, 50)),
    ("1h", at(2024, 6, 13, 23), at(2024, 6, 14)),
    ("1d", at(2024, 6, 14), at(2024, 6, 15)),
    ("1mo", at(2024, 7, 1), at(2024, 8, 1)),
]


@pytest.mark.parametrize(("duration", "reset", "next_reset"), RESETS, ids=[r[0] for r in RESETS])
async def test_budget_reset_at_is_the_instant_spend_resets_to_the_second(
    backend: Backend, duration: str, reset: float, next_reset: float
) -> None:
    team_id, key = await team_and_key(backend, duration)
    backend.clock.set(SEED_INSTANT + 0.5)
    first = await backend.authority.check(CheckRequest(api_key=key))
    assert first.budget_reset_at == reset
    assert (await backend.admin.get_team(team_id)).budget_reset_at == reset
    await settle(backend, "early", await admit(backend, key), 0.25)

    # Spend admitted at the last instant before the reset still counts in the old window.
    last = math.nextafter(reset, -math.inf)
    backend.clock.set(last)
    await settle(backend, "last", await admit(backend, key), 0.125)
    for before in (reset - 1, reset - 0.001, last):
        backend.clock.set(max(before, SEED_INSTANT + 0.5))
        seen = await backend.authority.check(CheckRequest(api_key=key))
        assert (seen.spend_nanos, seen.budget_reset_at) == (nanos(0.375), reset), before
        assert (await backend.admin.get_team(team_id)).spend_nanos == nanos(0.375)

    backend.clock.set(reset)
    after = await backend.authority.check(CheckRequest(api_key=key))
    assert (after.spend_nanos, after.budget_reset_at) == (0, next_reset)
    assert (await backend.admin.get_team(team_id)).spend_nanos == 0
    old = await charged(backend, team_id, last)
    assert old == (nanos(0.375), CounterState(nanos(0.375), 0))


# --- the real clock -----------------------------------------------------------------------


async def test_spend_resets_at_budget_reset_at_on_the_real_clock(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    async with start_replicas(
        tmp_path, database_url=database_url, redis_url=redis_url, count=1
    ) as cluster:
        stub = cluster.replicas[0].stub
        _, key = await create_team_and_key(stub, max_budget=1.0, budget_duration="1s")
        # Start early in a second, so check and record land in the same one.
        await asyncio.sleep(1.05 - time.time() % 1)
        check = await stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=key, estimated_cost=0.5), timeout=5
        )
        reset = check.budget_reset_at.ToNanoseconds() / 1e9
        assert check.allowed and reset == math.floor(reset) and 0 < reset - time.time() <= 1
        spent = await stub.RecordSpend(
            pb.RecordSpendRequest(
                request_id="real", reservation_id=check.reservation_id, cost=0.25
            ),
            timeout=5,
        )
        assert spent.team_spend == 0.25

        seen: list[tuple[float, float, float, float]] = []  # sent, answered, reset_at, spend
        while not seen or seen[-1][0] < reset + 0.3:
            sent = time.time()
            answer = await stub.CheckBudget(pb.CheckBudgetRequest(api_key=key), timeout=5)
            seen.append(
                (sent, time.time(), answer.budget_reset_at.ToNanoseconds() / 1e9, answer.spend)
            )
            await asyncio.sleep(0.005)

    before = [s for s in seen if s[2] == reset]
    after = [s for s in seen if s[2] != reset]
    assert before and after, seen
    assert seen == before + after  # once reset, it stays reset
    assert {spend for *_, spend in before} == {0.25}, "spend vanished before budget_reset_at"
    assert {spend for *_, spend in after} == {0.0}
    assert {s[2] for s in after} <= {reset + 1, reset + 2}
    # On the shared clock: answered before the instant -> old window; asked after -> new.
    assert all(s[2] == reset for s in seen if s[1] < reset)
    first_after = next(s for s in seen if s[0] >= reset)
    assert first_after[3] == 0.0 and first_after[2] == reset + 1


# --- daylight saving time in a configured time zone ---------------------------------------

# 2024-11-03 in New York: at 06:00Z the clocks go back from 02:00 EDT to 01:00 EST, so the
# hour 01:00-02:00 happens twice.
NEW_YORK = ZoneInfo("America/New_York")
FALL_BACK = at(2024, 11, 3, 6)
# Hour-long changes at 01:00/02:00/03:00 local, Lord Howe's 30-minute ones, Santiago's at
# midnight; Kolkata (UTC+5:30, no changes) for the plain path in an offset zone.
ZONES = ["America/New_York", "Europe/London", "Australia/Lord_Howe", "America/Santiago"]
SHORT = ["1s", "13s", "1m", "50m", "1h", "2h", "7h", "24h", "1d"]


def clock_changes(zone: str, year: int = 2024) -> list[float]:
    """The instants in ``year`` at which ``zone`` changes its UTC offset, to the second."""
    tz = ZoneInfo(zone)

    def offset(t: int) -> timedelta | None:
        return datetime.fromtimestamp(t, tz).utcoffset()

    changes = []
    for hour in range(int(at(year, 1, 1)), int(at(year + 1, 1, 1)), 3600):
        low, high = hour, hour + 3600
        if offset(low) == offset(high):
            continue
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if offset(middle) == offset(low) else (low, middle)
        changes.append(float(high))
    return changes


CHANGES = [(zone, change) for zone in ZONES for change in clock_changes(zone)]
CHANGES.append(("Asia/Kolkata", SEED_INSTANT))


def test_the_zones_probed_change_their_clocks_twice_a_year() -> None:
    assert len(CHANGES) == 2 * len(ZONES) + 1
    assert ("America/New_York", FALL_BACK) in CHANGES


@given(
    change=st.sampled_from(CHANGES),
    text=st.sampled_from(SHORT),
    shift=st.integers(min_value=-3 * 3600, max_value=3 * 3600),
)
def test_around_clock_changes_every_instant_is_in_exactly_one_window(
    change: tuple[str, float], text: str, shift: int
) -> None:
    tz, duration = ZoneInfo(change[0]), parse_duration(text)
    t = change[1] + shift + 0.5
    window = window_at(duration, t, tz)
    assert window.contains(t), (window, t)
    assert window.end is not None
    assert window_at(duration, window.end, tz).start == window.end
    assert window_at(duration, window.start, tz) == window


ONE_THIRTY_EDT = FALL_BACK - 1800 + 10  # 05:30:10Z, 01:30:10 EDT
ONE_THIRTY_EST = FALL_BACK + 1800 + 10  # 06:30:10Z, 01:30:10 EST: an hour later


def test_in_the_repeated_hour_each_minute_and_hour_is_its_own_window() -> None:
    one_thirty_edt, one_thirty_est = ONE_THIRTY_EDT, ONE_THIRTY_EST
    first = window_at(parse_duration("1m"), one_thirty_edt, NEW_YORK)
    second = window_at(parse_duration("1m"), one_thirty_est, NEW_YORK)
    assert (first.start, first.end) == (one_thirty_edt - 10, one_thirty_edt + 50)
    assert (second.start, second.end) == (one_thirty_est - 10, one_thirty_est + 50)
    hour = window_at(parse_duration("1h"), one_thirty_est, NEW_YORK)
    assert (hour.start, hour.end) == (FALL_BACK, FALL_BACK + 3600)  # 01:00 EST to 02:00 EST


async def test_spend_in_the_first_pass_of_a_repeated_hour_does_not_count_in_the_second(
    backend: Backend,
) -> None:
    secret = await backend.records.instance_secret()
    authority = Authority(
        backend.records, backend.counters, backend.clock, ReservationCodec(secret),
        enforcement=Enforcement.CROSS_ONCE, reservation_ttl=60.0, tz=NEW_YORK, prices={},
    )  # fmt: skip
    _, key = await team_and_key(backend, "1m")
    backend.clock.set(ONE_THIRTY_EDT)
    admitted = await authority.check(CheckRequest(api_key=key, estimated_cost=0.5))
    assert admitted.budget_reset_at == ONE_THIRTY_EDT + 50
    await authority.record(
        SpendRequest(request_id="edt", reservation_id=admitted.reservation_id, cost=0.25)
    )

    backend.clock.set(ONE_THIRTY_EST)  # the wall clock shows 01:30:10 again, an hour later
    again = await authority.check(CheckRequest(api_key=key))
    assert (again.spend_nanos, again.budget_reset_at) == (0, ONE_THIRTY_EST + 50)
