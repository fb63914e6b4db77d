"""One structured log line per decision and per recorded spend (logger ``budgetd.requests``).

The fields travel as the record's ``extra`` attributes, so the JSON formatter of
:mod:`server.logging_setup` writes them as JSON keys::

    {"ts": "...", "level": "info", "logger": "budgetd.requests", "msg": "CheckBudget denied",
     "event": "decision", "rpc": "CheckBudget", "request_id": "req-2", "key_alias": "bot",
     "key_id": "key_...", "team_id": "...", "decision": "denied", "reason": "BUDGET_EXCEEDED",
     "scope": "team", "latency_ms": 0.41}

Lines are at INFO; ``--log-level warning`` (``budgetd.log_level``) leaves them out, and then
nothing is built for them at all.
"""

from __future__ import annotations

import logging

from server.authority import Decision, SpendResult
from server.errors import BudgetdError, Unavailable
from server.money import nanos_to_usd

log = logging.getLogger("budgetd.requests")


def decisions_logged() -> bool:
    """True when decision lines are written (so a hot path builds its Decision only then)."""
    return log.isEnabledFor(logging.INFO)


def decision(rpc: str, request_id: str, answer: Decision, seconds: float) -> None:
    """Log a CheckBudget (or Envoy Check) answer."""
    if not log.isEnabledFor(logging.INFO):
        return
    outcome = "allowed" if answer.allowed else "denied"
    fields = {
        "event": "decision",
        "rpc": rpc,
        "request_id": request_id,
        "key_alias": answer.key_alias,
        "key_id": answer.key_id,
        "team_id": answer.team_id,
        "decision": outcome,
        "reason": answer.reason.value,
        "scope": answer.scope.value if answer.scope else "",
        "latency_ms": _ms(seconds),
    }
    if answer.allowed:
        fields["reserved_usd"] = nanos_to_usd(answer.reserved_nanos)
    log.info("%s %s", rpc, outcome, extra=fields)


def spend(rpc: str, request_id: str, result: SpendResult, seconds: float) -> None:
    """Log a RecordSpend (or an Envoy ext_proc settlement)."""
    if not log.isEnabledFor(logging.INFO):
        return
    log.info(
        "%s %s",
        rpc,
        "duplicate" if result.duplicate else "recorded",
        extra={
            "event": "spend",
            "rpc": rpc,
            "request_id": request_id,
            "key_alias": result.key_alias,
            "key_id": result.key_id,
            "team_id": result.team_id,
            "cost_usd": nanos_to_usd(result.cost_nanos),
            "duplicate": result.duplicate,
            "latency_ms": _ms(seconds),
        },
    )


def failure(rpc: str, request_id: str, error: BudgetdError, seconds: float) -> None:
    """Log a call answered with an error status (a backend outage as a warning)."""
    level = logging.WARNING if isinstance(error, Unavailable) else logging.INFO
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "%s failed: %s",
        rpc,
        error,
        extra={
            "event": "error",
            "rpc": rpc,
            "request_id": request_id,
            "error": type(error).__name__,
            "latency_ms": _ms(seconds),
        },
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
