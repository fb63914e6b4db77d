"""Wire forms of budgetd.v1.BudgetAuthority: protobuf messages <-> domain values.

Split from server/api.py so that it holds only the servicer. Everything here turns one
form into the other and uses no service state (WireDecisions only keeps its templates'
messages): the decision answers (decision_to_pb, WireDecisions for the hot path), the admin
records (team_to_pb, key_to_pb, member_to_pb), the request-side helpers of the handlers
(opt, ts_or_none, model_budgets_in, member_changes) and a domain error's wire form, abort
(its gRPC status from the error table). server/api.py (the decision RPCs) and
server/api_admin.py (the admin RPCs) both import from here, so these are public names;
server/api_reports.py holds the conversions of GetSpend and ListKeys.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2, timestamp_pb2

from server import wire_bytes
from server.admin import KeyView, MemberChanges, MemberView, ModelBudgetInput, TeamView
from server.authority import Decision
from server.errors import BudgetdError, grpc_code
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.hot import HotAllow
from server.money import nanos_to_usd
from server.storage.base import ModelBudget, ScopeKind
from server.wire_bytes import length_delimited

Context = grpc.aio.ServicerContext[Any, Any]

_SCOPES = {
    ScopeKind.KEY: pb.SCOPE_KEY,
    ScopeKind.TEAM: pb.SCOPE_TEAM,
    ScopeKind.MEMBER: pb.SCOPE_TEAM_MEMBER,
}
_RESERVATION_ID = wire_bytes.Field.of(pb.CheckBudgetResponse, "reservation_id")
_RESERVED = wire_bytes.Field.of(pb.CheckBudgetResponse, "reserved")
# A template's serialised CheckBudgetResponse without those two, in Decision.forms.
_GRPC_FORM = "grpc"


async def abort(context: Context, error: BudgetdError) -> NoReturn:
    await context.abort(grpc_code(error), str(error))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def usd_or_none(nanos: int | None) -> float | None:
    return None if nanos is None else nanos_to_usd(nanos)


def ts(instant: float | None) -> timestamp_pb2.Timestamp | None:
    if instant is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(instant * 1_000_000) * 1000)
    return ts


def ts_or_none(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _struct(data: dict[str, Any]) -> struct_pb2.Struct | None:
    if not data:
        return None
    out = struct_pb2.Struct()
    out.update(data)
    return out


def model_budgets_in(given: Any) -> dict[str, ModelBudgetInput]:
    return {
        model: ModelBudgetInput(entry.budget_limit, entry.time_period)
        for model, entry in given.items()
    }


def model_budgets_out(budgets: Any) -> dict[str, pb.ModelBudget]:
    return {
        model: pb.ModelBudget(budget_limit=nanos_to_usd(b.limit_nanos), time_period=b.duration)
        for model, b in budgets.items()
        if isinstance(b, ModelBudget)
    }


def member_changes(request: pb.TeamMemberRequest) -> MemberChanges:
    return MemberChanges(
        team_id=request.team_id,
        user_id=request.user_id,
        max_budget=opt(request, "max_budget"),
        budget_duration=opt(request, "budget_duration"),
        rpm_limit=opt(request, "rpm_limit"),
        tpm_limit=opt(request, "tpm_limit"),
        clear_max_budget=request.clear_max_budget,
        clear_rpm_limit=request.clear_rpm_limit,
        clear_tpm_limit=request.clear_tpm_limit,
        clear_budget_duration=request.clear_budget_duration,
    )


def member_to_pb(view: MemberView) -> pb.TeamMember:
    """The wire form of a team member with what applies to them and their spend."""
    member, terms = view.member, view.terms
    return pb.TeamMember(
        team_id=member.team_id,
        user_id=member.user_id,
        max_budget=usd_or_none(member.max_budget_nanos),
        budget_duration=member.budget_duration,
        rpm_limit=member.rpm_limit,
        tpm_limit=member.tpm_limit,
        effective_max_budget=usd_or_none(terms.max_budget_nanos),
        effective_budget_duration=terms.budget_duration,
        effective_rpm_limit=terms.rpm_limit,
        effective_tpm_limit=terms.tpm_limit,
        spend=nanos_to_usd(view.spend_nanos),
        budget_reset_at=ts(view.budget_reset_at),
        created_at=ts(member.created_at),
    )


class WireDecisions:
    """:func:`decision_to_pb`, converting a hot-path template once (server.hot).

    Allows from the hot path differ from their template only in ``reservation_id`` and
    ``reserved``: each answer is the template's serialised message without those two,
    followed by those two (:mod:`server.wire_bytes`), which gRPC sends as they are.
    """

    def __init__(self) -> None:
        self._holds: wire_bytes.HoldFields[bytes] = wire_bytes.HoldFields()

    def convert(self, decision: Decision) -> pb.CheckBudgetResponse | bytes:
        """The answer to send: a message, or a hot allow's serialised form."""
        template = decision.template
        if template is None:
            return decision_to_pb(decision)
        return self.hot(HotAllow(template, decision.reservation_id, decision.reserved_nanos))

    def hot(self, allow: HotAllow) -> bytes:
        """The serialised CheckBudgetResponse of a hot-path allow: its template's, then
        its own reservation id and hold."""
        forms = allow.template.forms
        base = forms.get(_GRPC_FORM)
        if base is None:
            answer = decision_to_pb(allow.template)
            answer.ClearField("reservation_id")
            answer.ClearField("reserved")
            base = forms[_GRPC_FORM] = answer.SerializeToString()
        hold = self._holds.get(allow.reserved_nanos)
        if hold is None:
            reserved = _RESERVED.double(nanos_to_usd(allow.reserved_nanos))
            hold = self._holds.keep(allow.reserved_nanos, reserved)
        reservation_id = length_delimited(_RESERVATION_ID.key, allow.reservation_id.encode())
        return base + reservation_id + hold


def decision_to_pb(decision: Decision) -> pb.CheckBudgetResponse:
    """The wire form of a Decision."""
    rate = decision.rate
    return pb.CheckBudgetResponse(
        allowed=decision.allowed,
        reason=pb.Reason.Value(decision.reason.value),
        message=decision.message,
        team_id=decision.team_id,
        key_id=decision.key_id,
        key_alias=decision.key_alias,
        scope=_SCOPES[decision.scope] if decision.scope else pb.SCOPE_UNSPECIFIED,
        spend=nanos_to_usd(decision.spend_nanos),
        max_budget=usd_or_none(decision.max_budget_nanos),
        remaining=usd_or_none(decision.remaining_nanos),
        budget_reset_at=ts(decision.budget_reset_at),
        reservation_id=decision.reservation_id,
        reserved=nanos_to_usd(decision.reserved_nanos),
        retry_after=decision.retry_after,
        user_id=decision.user_id,
        model=decision.model,
        soft_budget_exceeded=decision.soft_budget_exceeded,
        ratelimit_limit=rate.per_minute if rate else None,
        ratelimit_remaining=rate.remaining if rate else None,
        ratelimit_reset=rate.reset_after if rate else None,
    )


def team_to_pb(view: TeamView) -> pb.Team:
    """The wire form of a team with its current spend."""
    team = view.team
    return pb.Team(
        team_id=team.team_id,
        team_alias=team.team_alias,
        max_budget=usd_or_none(team.max_budget_nanos),
        budget_duration=team.budget_duration,
        budget_reset_at=ts(view.budget_reset_at),
        spend=nanos_to_usd(view.spend_nanos),
        tpm_limit=team.tpm_limit,
        rpm_limit=team.rpm_limit,
        models=list(team.models),
        metadata=_struct(team.metadata),
        blocked=team.blocked,
        created_at=ts(team.created_at),
        soft_budget=usd_or_none(team.soft_budget_nanos),
        team_member_budget=usd_or_none(team.member_budget_nanos),
        team_member_budget_duration=team.member_budget_duration,
        team_member_rpm_limit=team.member_rpm_limit,
        team_member_tpm_limit=team.member_tpm_limit,
        model_max_budget=model_budgets_out(team.model_max_budget),
    )


def key_to_pb(view: KeyView) -> pb.Key:
    """The wire form of a key (never its plaintext)."""
    key = view.key
    return pb.Key(
        key_id=key.key_id,
        team_id=key.team_id,
        key_alias=key.key_alias,
        max_budget=usd_or_none(key.max_budget_nanos),
        budget_duration=key.budget_duration,
        budget_reset_at=ts(view.budget_reset_at),
        spend=nanos_to_usd(view.spend_nanos),
        expires=ts(key.expires_at),
        models=list(key.models),
        user_id=key.user_id,
        revoked=key.revoked_at is not None,
        created_at=ts(key.created_at),
        key_prefix=key.key_prefix,
        blocked=key.blocked,
        soft_budget=usd_or_none(key.soft_budget_nanos),
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        model_max_budget=model_budgets_out(key.model_max_budget),
    )
