"""Money is exact: nano-USD integers inside, floats only on the wire."""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.money import (
    MoneyError,
    budget_exceeded_message,
    decimal_to_nanos,
    nanos_to_decimal,
    nanos_to_usd,
    usd_to_nanos,
)


def test_seed_denial_message_is_litellms_exactly() -> None:
    message = budget_exceeded_message(usd_to_nanos(3.5e-6), usd_to_nanos(1e-9))
    assert message == "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"


def test_a_million_spends_of_1e7_sum_to_exactly_0_1() -> None:
    total = sum(usd_to_nanos(1e-7) for _ in range(1_000_000))
    assert total == 100_000_000
    assert nanos_to_usd(total) == 0.1
    assert nanos_to_decimal(total) == nanos_to_decimal(100_000_000)


@pytest.mark.parametrize("bad", [-1e-9, -1.0, math.nan, math.inf, -math.inf, 1e12])
def test_impossible_amounts_are_refused(bad: float) -> None:
    with pytest.raises(MoneyError, match="cost"):
        usd_to_nanos(bad)


def test_round_trip_through_decimal_is_exact() -> None:
    for nanos in (0, 1, 3500, 123_456_789_012, 10**18):
        assert decimal_to_nanos(nanos_to_decimal(nanos)) == nanos


def test_wire_values_convert_through_their_shortest_repr() -> None:
    assert usd_to_nanos(0.1) == 100_000_000
    assert usd_to_nanos(0.000000001) == 1
    assert usd_to_nanos(100.0) == 100_000_000_000
    assert nanos_to_usd(9_700) == 9.7e-06


@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False, allow_infinity=False))
def test_the_fast_conversion_is_decimals_conversion(value: float) -> None:
    # usd_to_nanos skips Decimal for amounts with at most 9 decimals: the same integer.
    expected = int(
        Decimal(repr(value)).quantize(Decimal("1e-9"), rounding=ROUND_HALF_EVEN).scaleb(9)
    )
    assert usd_to_nanos(value) == expected


@given(st.integers(min_value=-(10**19), max_value=10**19))
def test_nanos_to_usd_is_the_nearest_double(nanos: int) -> None:
    assert nanos_to_usd(nanos) == float(Decimal(nanos).scaleb(-9))
