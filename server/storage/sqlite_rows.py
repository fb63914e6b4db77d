"""Records to SQLite rows and back: the column lists and their conversions.

Models, metadata and per-model budgets are stored as JSON text and flags as 0 or 1; money
(integer nano-USD) and instants (Unix seconds) are stored as the records hold them. Each
``*_args`` tuple is in its ``*_COLUMNS`` order (the record store's updates slice it by
position), with one ``?`` of ``*_MARKS`` per column.
"""

from __future__ import annotations

import json
from typing import Any, Final

from server.storage.base import KeyRecord, LedgerEntry, MemberRecord, TeamRecord
from server.storage.model_budgets import decode_model_budgets, encode_model_budgets

TEAM_COLUMNS: Final = (
    "team_id, team_alias, max_budget_nanos, budget_duration, tpm_limit, rpm_limit, models,"
    " metadata, blocked, created_at, soft_budget_nanos, member_budget_nanos,"
    " member_budget_duration, member_rpm_limit, member_tpm_limit, model_max_budget"
)
TEAM_MARKS: Final = ",".join("?" * 16)
# Every column but team_id and created_at (kept by update_team, as before).
TEAM_UPDATE: Final = (
    "team_alias=?, max_budget_nanos=?, budget_duration=?, tpm_limit=?, rpm_limit=?, models=?,"
    " metadata=?, blocked=?, soft_budget_nanos=?, member_budget_nanos=?,"
    " member_budget_duration=?, member_rpm_limit=?, member_tpm_limit=?, model_max_budget=?"
)
KEY_COLUMNS: Final = (
    "key_id, key_hash, key_prefix, team_id, key_alias, max_budget_nanos, budget_duration,"
    " expires_at, models, user_id, revoked_at, created_at, blocked, soft_budget_nanos,"
    " rpm_limit, tpm_limit, model_max_budget"
)
KEY_MARKS: Final = ",".join("?" * 17)
# The mutable fields only: hash, prefix, team, user, revocation and creation are kept.
KEY_UPDATE: Final = (
    "key_alias=?, max_budget_nanos=?, budget_duration=?, expires_at=?, models=?, blocked=?,"
    " soft_budget_nanos=?, rpm_limit=?, tpm_limit=?, model_max_budget=?"
)
MEMBER_COLUMNS: Final = (
    "team_id, user_id, max_budget_nanos, budget_duration, rpm_limit, tpm_limit, created_at"
)
LEDGER_COLUMNS: Final = (
    "request_id, team_id, key_id, cost_nanos, admitted_at, recorded_at, reservation_id, model,"
    " prompt_tokens, completion_tokens, metadata, user_id"
)


def team_args(team: TeamRecord) -> tuple[Any, ...]:
    """A team's values, in ``TEAM_COLUMNS`` order."""
    return (
        team.team_id,
        team.team_alias,
        team.max_budget_nanos,
        team.budget_duration,
        team.tpm_limit,
        team.rpm_limit,
        json.dumps(list(team.models)),
        json.dumps(team.metadata),
        int(team.blocked),
        team.created_at,
        team.soft_budget_nanos,
        team.member_budget_nanos,
        team.member_budget_duration,
        team.member_rpm_limit,
        team.member_tpm_limit,
        json.dumps(encode_model_budgets(team.model_max_budget)),
    )


def team_from_row(row: tuple[Any, ...]) -> TeamRecord:
    """The team of a row selected as ``TEAM_COLUMNS``."""
    return TeamRecord(
        team_id=row[0],
        team_alias=row[1],
        max_budget_nanos=row[2],
        budget_duration=row[3],
        tpm_limit=row[4],
        rpm_limit=row[5],
        models=tuple(json.loads(row[6])),
        metadata=json.loads(row[7]),
        blocked=bool(row[8]),
        created_at=row[9],
        soft_budget_nanos=row[10],
        member_budget_nanos=row[11],
        member_budget_duration=row[12],
        member_rpm_limit=row[13],
        member_tpm_limit=row[14],
        model_max_budget=decode_model_budgets(json.loads(row[15])),
    )


def key_args(key: KeyRecord) -> tuple[Any, ...]:
    """A key's values, in ``KEY_COLUMNS`` order."""
    return (
        key.key_id,
        key.key_hash,
        key.key_prefix,
        key.team_id,
        key.key_alias,
        key.max_budget_nanos,
        key.budget_duration,
        key.expires_at,
        json.dumps(list(key.models)),
        key.user_id,
        key.revoked_at,
        key.created_at,
        int(key.blocked),
        key.soft_budget_nanos,
        key.rpm_limit,
        key.tpm_limit,
        json.dumps(encode_model_budgets(key.model_max_budget)),
    )


def key_from_row(row: tuple[Any, ...]) -> KeyRecord:
    """The key of a row selected as ``KEY_COLUMNS``."""
    return KeyRecord(
        key_id=row[0],
        key_hash=row[1],
        key_prefix=row[2],
        team_id=row[3],
        key_alias=row[4],
        max_budget_nanos=row[5],
        budget_duration=row[6],
        expires_at=row[7],
        models=tuple(json.loads(row[8])),
        user_id=row[9],
        revoked_at=row[10],
        created_at=row[11],
        blocked=bool(row[12]),
        soft_budget_nanos=row[13],
        rpm_limit=row[14],
        tpm_limit=row[15],
        model_max_budget=decode_model_budgets(json.loads(row[16])),
    )


def member_args(member: MemberRecord) -> tuple[Any, ...]:
    """A membership's values, in ``MEMBER_COLUMNS`` order."""
    return (
        member.team_id,
        member.user_id,
        member.max_budget_nanos,
        member.budget_duration,  # None: the team's member_budget_duration
        member.rpm_limit,
        member.tpm_limit,
        member.created_at,
    )


def member_from_row(row: tuple[Any, ...]) -> MemberRecord:
    """The membership of a row selected as ``MEMBER_COLUMNS``."""
    return MemberRecord(
        team_id=row[0],
        user_id=row[1],
        max_budget_nanos=row[2],
        budget_duration=row[3],
        rpm_limit=row[4],
        tpm_limit=row[5],
        created_at=row[6],
    )


def ledger_args(entry: LedgerEntry) -> tuple[Any, ...]:
    """A ledger entry's values, in ``LEDGER_COLUMNS`` order."""
    return (
        entry.request_id,
        entry.team_id,
        entry.key_id,
        entry.cost_nanos,
        entry.admitted_at,
        entry.recorded_at,
        entry.reservation_id,
        entry.model,
        entry.prompt_tokens,
        entry.completion_tokens,
        json.dumps(entry.metadata),
        entry.user_id,
    )


def ledger_from_row(row: tuple[Any, ...]) -> LedgerEntry:
    """The ledger entry of a row selected as ``LEDGER_COLUMNS``."""
    return LedgerEntry(
        request_id=row[0],
        team_id=row[1],
        key_id=row[2],
        cost_nanos=row[3],
        admitted_at=row[4],
        recorded_at=row[5],
        reservation_id=row[6],
        model=row[7],
        prompt_tokens=row[8],
        completion_tokens=row[9],
        metadata=json.loads(row[10]),
        user_id=row[11],
    )
