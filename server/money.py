"""Exact money: USD on the wire, integer nano-USD inside.

Floats never accumulate in budgetd. A wire double is converted through its shortest
decimal representation (``repr``), so 1e-7 becomes exactly 100 nano-USD and a million of
them sum to exactly 0.1 USD.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000
_NANO = Decimal("1e-9")
# Far above any real budget, far below int64 overflow in Redis (9.2e18 nano = 9.2e9 USD).
MAX_USD = 1_000_000_000.0


class MoneyError(ValueError):
    """A USD amount that budgetd cannot accept (negative, NaN, infinite or too large)."""


def usd_to_nanos(value: float, *, field: str = "cost") -> int:
    """Convert a wire USD amount to exact nano-USD, rounding half-even below 1e-9."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MoneyError(f"{field} must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise MoneyError(f"{field} must be a finite number, got {value!r}")
    if value < 0:
        raise MoneyError(f"{field} must not be negative, got {value!r}")
    if value > MAX_USD:
        raise MoneyError(f"{field} must be at most {MAX_USD:.0f} USD, got {value!r}")
    text = repr(float(value))
    whole_nanos = _whole_nanos(text)
    if whole_nanos is not None:
        return whole_nanos
    try:
        exact = Decimal(text)
    except InvalidOperation as exc:  # pragma: no cover - repr of a finite float always parses
        raise MoneyError(f"{field} is not a number: {value!r}") from exc
    return int(exact.quantize(_NANO, rounding=ROUND_HALF_EVEN).scaleb(9))


def _whole_nanos(text: str) -> int | None:
    """The nano-USD of a non-negative ``repr`` numeral ("0.001", "1e-09", "3.5e-06") when it
    has at most 9 decimals, so no rounding is needed; None otherwise (Decimal rounds it).

    The same integer Decimal gives, without Decimal's cost: this runs on every decision.
    """
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    shift = 9 + (int(exponent) if exponent else 0) - len(fraction)
    if shift < 0:
        return None
    return int(whole + fraction + "0" * shift)


def nanos_to_usd(nanos: int) -> float:
    """The wire double for an exact nano-USD amount (3500 -> 3.5e-06).

    Python divides integers with correct rounding: the double nearest the exact quotient,
    the same one ``float(Decimal(nanos).scaleb(-9))`` gives, at a fraction of its cost.
    """
    return nanos / NANOS_PER_USD


def nanos_to_decimal(nanos: int) -> Decimal:
    """Exact decimal USD for NUMERIC columns."""
    return Decimal(nanos).scaleb(-9)


def decimal_to_nanos(value: Decimal) -> int:
    """Exact nano-USD from a NUMERIC column value (scale 9)."""
    return int(value.scaleb(9).to_integral_value(rounding=ROUND_HALF_EVEN))


def budget_exceeded_message(spend_nanos: int, max_budget_nanos: int) -> str:
    """LiteLLM's denial text, floats shown with Python ``repr``."""
    return (
        f"Budget has been exceeded! Current cost: {nanos_to_usd(spend_nanos)!r}, "
        f"Max budget: {nanos_to_usd(max_budget_nanos)!r}"
    )
