"""The one comparison rule, pure. The Redis Lua scripts mirror it line for line."""

from __future__ import annotations

from enum import StrEnum


class Enforcement(StrEnum):
    """How a budget is compared with spend.

    ``cross_once`` (LiteLLM's behaviour): admit while ``spend + held < max_budget``; the
    request that crosses the line completes, the next one is denied.
    ``never_exceed``: admit only if ``spend + held + estimate <= max_budget``.
    """

    CROSS_ONCE = "cross_once"
    NEVER_EXCEED = "never_exceed"


def admits(mode: Enforcement, limit: int | None, spend: int, held: int, amount: int) -> bool:
    """Whether a scope with ``limit`` nano-USD admits a request holding ``amount`` more."""
    if limit is None:
        return True
    if mode is Enforcement.NEVER_EXCEED:
        return spend + held + amount <= limit
    return spend + held < limit
