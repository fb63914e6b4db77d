"""Pricing requests from token counts with the configured per-token prices (exact)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Protocol

_NANO = Decimal("1e-9")


class Price(Protocol):
    """USD per token for one model (LiteLLM's input/output_cost_per_token)."""

    @property
    def input_cost_per_token(self) -> Decimal: ...

    @property
    def output_cost_per_token(self) -> Decimal: ...


def price_nanos(
    prices: Mapping[str, Price], model: str, prompt_tokens: int, completion_tokens: int
) -> int | None:
    """Exact cost in nano-USD of a request, or None when the model has no price."""
    price = prices.get(model)
    if price is None:
        return None
    usd = (
        price.input_cost_per_token * prompt_tokens + price.output_cost_per_token * completion_tokens
    )
    return int(usd.quantize(_NANO, rounding=ROUND_HALF_EVEN).scaleb(9))
