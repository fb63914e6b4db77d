"""Records to Postgres rows and back: the column lists and their conversions.

Money is NUMERIC(30, 9) in the database and integer nano-USD in records, converted exactly
through :mod:`server.money`; instants are timestamptz in the database and Unix seconds in
records. Each ``*_args`` tuple is in its ``*_COLUMNS`` order.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Final

import asyncpg

from server.money import decimal_to_nanos, nanos_to_decimal
from server.storage.base import KeyRecord, LedgerEntry, MemberRecord, TeamRecord
from server.storage.model_budgets import decode_model_budgets, encode_model_budgets
from server.storage.postgres_driver import or_none, to_micros, to_timestamp

TEAM_COLUMNS: Final = (
    "team_id, team_alias, max_budget, budget_duration, tpm_limit, rpm_limit, models,"
    " metadata, blocked, created_at, soft_budget, member_budget, member_budget_duration,"
    " member_rpm_limit, member_tpm_limit, model_max_budget"
)
TEAM_VALUES: Final = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16"
KEY_COLUMNS: Final = (
    "key_id, key_hash, key_prefix, team_id, key_alias, max_budget, budget_duration,"
    " expires_at, models, user_id, revoked_at, created_at, blocked, soft_budget, rpm_limit,"
    " tpm_limit, model_max_budget"
)
MEMBER_COLUMNS: Final = (
    "team_id, user_id, max_budget, budget_duration, rpm_limit, tpm_limit, created_at"
)
LEDGER_COLUMNS: Final = (
    "request_id, team_id, key_id, cost, admitted_at, recorded_at, reservation_id, model,"
    " prompt_tokens, completion_tokens, metadata, user_id"
)


def returned(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row a RETURNING statement must have returned."""
    if row is None:  # cannot happen: the row was just inserted, or conflicted with it
        raise RuntimeError("postgres returned no row where one was expected")
    return row


def team_args(team: TeamRecord) -> tuple[Any, ...]:
    """A team's values, in ``TEAM_COLUMNS`` order."""
    return (
        team.team_id,
        team.team_alias,
        or_none(nanos_to_decimal, team.max_budget_nanos),
        team.budget_duration,
        team.tpm_limit,
        team.rpm_limit,
        list(team.models),
        team.metadata,
        team.blocked,
        to_timestamp(team.created_at),
        or_none(nanos_to_decimal, team.soft_budget_nanos),
        or_none(nanos_to_decimal, team.member_budget_nanos),
        team.member_budget_duration,
        team.member_rpm_limit,
        team.member_tpm_limit,
        encode_model_budgets(team.model_max_budget),
    )


def team_from_row(row: asyncpg.Record) -> TeamRecord:
    """The team of a row of ``TEAM_COLUMNS``."""
    return TeamRecord(
        team_id=row["team_id"],
        team_alias=row["team_alias"],
        max_budget_nanos=or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        tpm_limit=row["tpm_limit"],
        rpm_limit=row["rpm_limit"],
        models=tuple(row["models"]),
        metadata=row["metadata"],
        blocked=row["blocked"],
        created_at=row["created_at"].timestamp(),
        soft_budget_nanos=or_none(decimal_to_nanos, row["soft_budget"]),
        member_budget_nanos=or_none(decimal_to_nanos, row["member_budget"]),
        member_budget_duration=row["member_budget_duration"],
        member_rpm_limit=row["member_rpm_limit"],
        member_tpm_limit=row["member_tpm_limit"],
        model_max_budget=decode_model_budgets(row["model_max_budget"]),
    )


# Optional text columns hold NULL for the records' "" (absent).
def key_args(key: KeyRecord) -> tuple[Any, ...]:
    """A key's values, in ``KEY_COLUMNS`` order."""
    return (
        key.key_id,
        key.key_hash,
        key.key_prefix or None,
        key.team_id,
        key.key_alias or None,
        or_none(nanos_to_decimal, key.max_budget_nanos),
        key.budget_duration,
        or_none(to_timestamp, key.expires_at),
        list(key.models),
        key.user_id or None,
        or_none(to_timestamp, key.revoked_at),
        to_timestamp(key.created_at),
        key.blocked,
        or_none(nanos_to_decimal, key.soft_budget_nanos),
        key.rpm_limit,
        key.tpm_limit,
        encode_model_budgets(key.model_max_budget),
    )


def key_update_args(key: KeyRecord) -> tuple[Any, ...]:
    """The key id and the mutable fields of a key, in the key UPDATE's order."""
    return (
        key.key_id,
        key.key_alias or None,
        or_none(nanos_to_decimal, key.max_budget_nanos),
        key.budget_duration,
        or_none(to_timestamp, key.expires_at),
        list(key.models),
        key.blocked,
        or_none(nanos_to_decimal, key.soft_budget_nanos),
        key.rpm_limit,
        key.tpm_limit,
        encode_model_budgets(key.model_max_budget),
    )


def key_from_row(row: asyncpg.Record) -> KeyRecord:
    """The key of a row of ``KEY_COLUMNS``."""
    return KeyRecord(
        key_id=row["key_id"],
        key_hash=row["key_hash"],
        team_id=row["team_id"],
        key_alias=row["key_alias"] or "",
        max_budget_nanos=or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        key_prefix=row["key_prefix"] or "",
        expires_at=or_none(datetime.timestamp, row["expires_at"]),
        models=tuple(row["models"] or ()),
        user_id=row["user_id"] or "",
        revoked_at=or_none(datetime.timestamp, row["revoked_at"]),
        created_at=row["created_at"].timestamp(),
        blocked=row["blocked"],
        soft_budget_nanos=or_none(decimal_to_nanos, row["soft_budget"]),
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        model_max_budget=decode_model_budgets(row["model_max_budget"]),
    )


def member_args(member: MemberRecord) -> tuple[Any, ...]:
    """A membership's values, in ``MEMBER_COLUMNS`` order."""
    return (
        member.team_id,
        member.user_id,
        or_none(nanos_to_decimal, member.max_budget_nanos),
        member.budget_duration,  # None: the team's member_budget_duration
        member.rpm_limit,
        member.tpm_limit,
        to_timestamp(member.created_at),
    )


def member_from_row(row: asyncpg.Record) -> MemberRecord:
    """The membership of a row of ``MEMBER_COLUMNS``."""
    return MemberRecord(
        team_id=row["team_id"],
        user_id=row["user_id"],
        max_budget_nanos=or_none(decimal_to_nanos, row["max_budget"]),
        budget_duration=row["budget_duration"],
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        created_at=row["created_at"].timestamp(),
    )


def ledger_args(entry: LedgerEntry) -> tuple[Any, ...]:
    """A ledger entry's values, in ``LEDGER_COLUMNS`` order."""
    return (
        entry.request_id,
        entry.team_id,
        entry.key_id,
        nanos_to_decimal(entry.cost_nanos),
        to_timestamp(entry.admitted_at),
        to_timestamp(entry.recorded_at),
        entry.reservation_id or None,
        entry.model or None,
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.metadata or None,  # the ledger is the big table: no '{}' on every row
        entry.user_id,
    )


def ledger_from_row(row: asyncpg.Record) -> LedgerEntry:
    """The ledger entry of a row of ``LEDGER_COLUMNS``."""
    return LedgerEntry(
        request_id=row["request_id"],
        team_id=row["team_id"],
        key_id=row["key_id"],
        cost_nanos=decimal_to_nanos(row["cost"]),
        admitted_at=row["admitted_at"].timestamp(),
        recorded_at=row["recorded_at"].timestamp(),
        reservation_id=row["reservation_id"] or "",
        model=row["model"] or "",
        prompt_tokens=row["prompt_tokens"] or 0,
        completion_tokens=row["completion_tokens"] or 0,
        metadata=row["metadata"] or {},
        user_id=row["user_id"],
    )


def as_stored(entry: LedgerEntry) -> LedgerEntry:
    """``entry`` as the ledger stores and reads it back: its instants floored to whole
    microseconds (the same float ``datetime.timestamp()`` gives for the stored value)."""
    return dataclasses.replace(
        entry,
        admitted_at=to_micros(entry.admitted_at) / 1_000_000,
        recorded_at=to_micros(entry.recorded_at) / 1_000_000,
    )
