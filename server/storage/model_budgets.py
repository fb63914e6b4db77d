"""``model_max_budget`` as stored: JSON that keeps every limit exact.

Both record stores keep a key's or team's per-model budgets as one JSON object::

    {"<model>": {"limit_nanos": "<integer nano-USD>", "duration": "<budget_duration>"}}

The limit is an integer *string* of nano-USD, so no reader (jq, a JavaScript admin page,
Postgres' own jsonb operators) ever turns it into a float; ``duration`` "" never resets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.storage.base import ModelBudget


def encode_model_budgets(budgets: Mapping[str, ModelBudget]) -> dict[str, dict[str, str]]:
    """The JSON object of ``budgets`` (models in sorted order)."""
    return {
        model: {"limit_nanos": str(int(budget.limit_nanos)), "duration": budget.duration}
        for model, budget in sorted(budgets.items())
    }


def decode_model_budgets(data: Mapping[str, Any] | None) -> dict[str, ModelBudget]:
    """The budgets stored as ``data`` (None or {} : none)."""
    if not data:
        return {}
    return {
        model: ModelBudget(int(entry["limit_nanos"]), entry.get("duration") or "")
        for model, entry in data.items()
    }
