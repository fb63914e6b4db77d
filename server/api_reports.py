"""Wire conversions of the read-only admin RPCs added for operators: GetSpend and ListKeys."""

from __future__ import annotations

from typing import Final

from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.money import nanos_to_usd
from server.reports import SpendReport, SpendRequest
from server.storage.base import SpendGroup, SpendRow

_GROUPS: Final = {
    pb.SPEND_GROUP_TEAM: SpendGroup.TEAM,
    pb.SPEND_GROUP_KEY: SpendGroup.KEY,
    pb.SPEND_GROUP_MODEL: SpendGroup.MODEL,
    pb.SPEND_GROUP_DAY: SpendGroup.DAY,
}


def spend_request(request: pb.GetSpendRequest) -> SpendRequest:
    """The domain question of a GetSpend call (SPEND_GROUP_UNSPECIFIED entries are ignored)."""
    return SpendRequest(
        start_date=request.start_date,
        end_date=request.end_date,
        group_by=tuple(_GROUPS[g] for g in request.group_by if g in _GROUPS),
        team_id=request.team_id,
        key_id=request.key_id,
        key=request.key,
        model=request.model,
        limit=request.limit,
    )


def spend_response(report: SpendReport) -> pb.GetSpendResponse:
    """The wire form of a report: exact sums become USD doubles only here."""
    return pb.GetSpendResponse(
        rows=[_row(row) for row in report.rows],
        total_spend=nanos_to_usd(report.total_nanos),
        truncated=report.truncated,
        start_date=report.start_date.isoformat(),
        end_date=report.end_date.isoformat(),
        timezone=report.timezone,
    )


def list_keys_request(request: pb.ListKeysRequest) -> tuple[str, int, str, bool]:
    """(team_id, page_size, page_token, include_revoked) of a ListKeys call."""
    return request.team_id, request.page_size, request.page_token, request.include_revoked


def _row(row: SpendRow) -> pb.SpendRow:
    return pb.SpendRow(
        day=row.day,
        team_id=row.team_id,
        team_alias=row.team_alias,
        key_id=row.key_id,
        key_alias=row.key_alias,
        hashed_api_key=row.key_hash,
        model=row.model,
        spend=nanos_to_usd(row.spend_nanos),
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
    )
