"""The gRPC face of budgetd.v1.BudgetAuthority: wire messages in, domain calls, wire out."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from server import answers, request_log
from server.admin import (
    Admin,
    KeyView,
    MemberChanges,
    MemberView,
    ModelBudgetInput,
    NewKey,
    NewTeam,
    TeamChanges,
    TeamView,
)
from server.api_reports import list_keys_request, spend_request, spend_response
from server.authority import Authority, CheckRequest, Decision, SpendRequest
from server.errors import BudgetdError, Unauthenticated, Unavailable, grpc_code
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc
from server.hot import HotAllow, TemplateForms
from server.identity import bearer_token, master_key_matches
from server.metrics import Metrics
from server.money import nanos_to_usd
from server.reports import SpendReports
from server.storage.base import ModelBudget, ScopeKind

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("budgetd.api")

NO_MASTER_KEY = (
    "admin calls are refused: no master key is configured. Set BUDGETD_MASTER_KEY (or "
    "LITELLM_MASTER_KEY, or general_settings.master_key in the config file) and restart "
    "budgetd; then send 'authorization: Bearer <master key>'"
)
BAD_MASTER_KEY = "admin calls need metadata 'authorization: Bearer <master key>'"

_SCOPES = {
    ScopeKind.KEY: pb.SCOPE_KEY,
    ScopeKind.TEAM: pb.SCOPE_TEAM,
    ScopeKind.MEMBER: pb.SCOPE_TEAM_MEMBER,
}


class BudgetAuthorityService(pb_grpc.BudgetAuthorityServicer):
    """Servicer: converts messages and maps domain errors through the one error table."""

    def __init__(
        self,
        authority: Authority,
        admin: Admin,
        master_key: str | None,
        metrics: Metrics,
        reports: SpendReports,
    ) -> None:
        self._authority = authority
        self._admin = admin
        self._master_key = master_key
        self._metrics = metrics
        self._reports = reports
        self._wire = WireDecisions()

    async def CheckBudget(
        self, request: pb.CheckBudgetRequest, context: Context
    ) -> pb.CheckBudgetResponse:
        started = time.perf_counter()
        # A busy key's allow straight off the wire (server.hot); anything else, in full.
        hot = self._authority.check_hot(
            request.api_key,
            request.model,
            request.user_id,
            request.request_id,
            request.estimated_cost if request.HasField("estimated_cost") else None,
            request.max_tokens if request.HasField("max_tokens") else None,
            request.prompt_tokens if request.HasField("prompt_tokens") else None,
        )
        if hot is not None:
            seconds = time.perf_counter() - started
            self._metrics.observe_latency("CheckBudget", seconds)
            self._metrics.decision(hot.template)  # counted by outcome, reason and scope
            if request_log.decisions_logged():
                decision = answers.admitted(*hot)
                request_log.decision("CheckBudget", request.request_id, decision, seconds)
            return self._wire.hot(hot)
        req = CheckRequest(
            api_key=request.api_key,
            model=request.model,
            estimated_cost=_opt(request, "estimated_cost"),
            request_id=request.request_id,
            user_id=request.user_id,
            max_tokens=_opt(request, "max_tokens"),
            prompt_tokens=_opt(request, "prompt_tokens"),
            jwt=request.jwt,
        )
        call = self._authority.check(req)
        decision, seconds = await self._decide(context, "CheckBudget", req.request_id, call)
        self._metrics.decision(decision)
        request_log.decision("CheckBudget", req.request_id, decision, seconds)
        return self._wire.convert(decision)

    async def RecordSpend(
        self, request: pb.RecordSpendRequest, context: Context
    ) -> pb.RecordSpendResponse:
        req = SpendRequest(
            request_id=request.request_id,
            reservation_id=request.reservation_id,
            api_key=request.api_key,
            cost=_opt(request, "cost"),
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            # Most spends carry no metadata: skip the (slow, pure-Python) conversion then.
            metadata=json_format.MessageToDict(request.metadata) if request.metadata.fields else {},
        )
        call = self._authority.record(req)
        result, seconds = await self._decide(context, "RecordSpend", req.request_id, call)
        self._metrics.spend(result)
        request_log.spend("RecordSpend", req.request_id, result, seconds)
        return pb.RecordSpendResponse(
            team_spend=nanos_to_usd(result.team_spend_nanos),
            key_spend=nanos_to_usd(result.key_spend_nanos),
            duplicate=result.duplicate,
            cost=nanos_to_usd(result.cost_nanos),
        )

    async def CreateTeam(self, request: pb.CreateTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        req = NewTeam(
            team_alias=request.team_alias,
            max_budget=_opt(request, "max_budget"),
            budget_duration=request.budget_duration,
            team_id=request.team_id,
            tpm_limit=_opt(request, "tpm_limit"),
            rpm_limit=_opt(request, "rpm_limit"),
            models=list(request.models),
            metadata=json_format.MessageToDict(request.metadata),
            soft_budget=_opt(request, "soft_budget"),
            team_member_budget=_opt(request, "team_member_budget"),
            team_member_budget_duration=request.team_member_budget_duration,
            team_member_rpm_limit=_opt(request, "team_member_rpm_limit"),
            team_member_tpm_limit=_opt(request, "team_member_tpm_limit"),
            model_max_budget=_model_budgets_in(request.model_max_budget),
            blocked=request.blocked,
        )
        return team_to_pb(await self._guard(context, self._admin.create_team(req)))

    async def GetTeam(self, request: pb.GetTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        return team_to_pb(await self._guard(context, self._admin.get_team(request.team_id)))

    async def ListTeams(
        self, request: pb.ListTeamsRequest, context: Context
    ) -> pb.ListTeamsResponse:
        await self._authorize(context)
        teams, token = await self._guard(
            context, self._admin.list_teams(request.page_size, request.page_token)
        )
        return pb.ListTeamsResponse(teams=[team_to_pb(t) for t in teams], next_page_token=token)

    async def UpdateTeam(self, request: pb.UpdateTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        req = TeamChanges(
            team_id=request.team_id,
            team_alias=_opt(request, "team_alias"),
            max_budget=_opt(request, "max_budget"),
            clear_max_budget=request.clear_max_budget,
            budget_duration=_opt(request, "budget_duration"),
            tpm_limit=_opt(request, "tpm_limit"),
            rpm_limit=_opt(request, "rpm_limit"),
            models=list(request.models) if request.update_models else None,
            metadata=json_format.MessageToDict(request.metadata)
            if request.HasField("metadata")
            else None,
            soft_budget=_opt(request, "soft_budget"),
            team_member_budget=_opt(request, "team_member_budget"),
            team_member_budget_duration=_opt(request, "team_member_budget_duration"),
            team_member_rpm_limit=_opt(request, "team_member_rpm_limit"),
            team_member_tpm_limit=_opt(request, "team_member_tpm_limit"),
            model_max_budget=_model_budgets_in(request.model_max_budget)
            if request.update_model_max_budget or request.model_max_budget
            else None,
            blocked=_opt(request, "blocked"),
            clear_soft_budget=request.clear_soft_budget,
            clear_team_member_budget=request.clear_team_member_budget,
            clear_team_member_rpm_limit=request.clear_team_member_rpm_limit,
            clear_team_member_tpm_limit=request.clear_team_member_tpm_limit,
        )
        return team_to_pb(await self._guard(context, self._admin.update_team(req)))

    async def IssueKey(self, request: pb.IssueKeyRequest, context: Context) -> pb.IssueKeyResponse:
        await self._authorize(context)
        req = NewKey(
            team_id=request.team_id,
            key_alias=request.key_alias,
            max_budget=_opt(request, "max_budget"),
            budget_duration=request.budget_duration,
            expires=_ts_or_none(request.expires) if request.HasField("expires") else None,
            models=list(request.models),
            user_id=request.user_id,
            duration=request.duration,
            soft_budget=_opt(request, "soft_budget"),
            rpm_limit=_opt(request, "rpm_limit"),
            tpm_limit=_opt(request, "tpm_limit"),
            model_max_budget=_model_budgets_in(request.model_max_budget),
            blocked=request.blocked,
        )
        issued = await self._guard(context, self._admin.issue_key(req))
        key = issued.view.key
        return pb.IssueKeyResponse(
            key=issued.plaintext,
            key_id=key.key_id,
            team_id=key.team_id,
            key_alias=key.key_alias,
            max_budget=_usd_or_none(key.max_budget_nanos),
            budget_duration=key.budget_duration,
            budget_reset_at=_ts(issued.view.budget_reset_at),
            expires=_ts(key.expires_at),
            models=list(key.models),
            user_id=key.user_id,
            soft_budget=_usd_or_none(key.soft_budget_nanos),
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            model_max_budget=_model_budgets_out(key.model_max_budget),
            blocked=key.blocked,
        )

    async def GetKey(self, request: pb.GetKeyRequest, context: Context) -> pb.Key:
        await self._authorize(context)
        view = await self._guard(context, self._admin.get_key(request.key_id, request.key))
        return key_to_pb(view)

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: Context) -> pb.Key:
        await self._authorize(context)
        view = await self._guard(context, self._admin.revoke_key(request.key_id, request.key))
        return key_to_pb(view)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        await self._authorize(context)
        team_id, size, token, revoked = list_keys_request(request)
        keys, next_token = await self._guard(
            context, self._admin.list_keys(team_id, size, token, include_revoked=revoked)
        )
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in keys], next_page_token=next_token)

    async def AddTeamMember(self, request: pb.TeamMemberRequest, context: Context) -> pb.TeamMember:
        await self._authorize(context)
        view = await self._guard(context, self._admin.add_member(_member_changes(request)))
        return member_to_pb(view)

    async def UpdateTeamMember(
        self, request: pb.TeamMemberRequest, context: Context
    ) -> pb.TeamMember:
        await self._authorize(context)
        view = await self._guard(context, self._admin.update_member(_member_changes(request)))
        return member_to_pb(view)

    async def RemoveTeamMember(
        self, request: pb.RemoveTeamMemberRequest, context: Context
    ) -> pb.TeamMember:
        await self._authorize(context)
        call = self._admin.remove_member(request.team_id, request.user_id)
        return member_to_pb(await self._guard(context, call))

    async def ListTeamMembers(
        self, request: pb.ListTeamMembersRequest, context: Context
    ) -> pb.ListTeamMembersResponse:
        await self._authorize(context)
        views = await self._guard(context, self._admin.list_members(request.team_id))
        return pb.ListTeamMembersResponse(members=[member_to_pb(v) for v in views])

    async def BlockTeam(self, request: pb.GetTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        call = self._admin.set_team_blocked(request.team_id, True)
        return team_to_pb(await self._guard(context, call))

    async def UnblockTeam(self, request: pb.GetTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        call = self._admin.set_team_blocked(request.team_id, False)
        return team_to_pb(await self._guard(context, call))

    async def BlockKey(self, request: pb.GetKeyRequest, context: Context) -> pb.Key:
        await self._authorize(context)
        call = self._admin.set_key_blocked(True, request.key_id, request.key)
        return key_to_pb(await self._guard(context, call))

    async def UnblockKey(self, request: pb.GetKeyRequest, context: Context) -> pb.Key:
        await self._authorize(context)
        call = self._admin.set_key_blocked(False, request.key_id, request.key)
        return key_to_pb(await self._guard(context, call))

    async def GetSpend(self, request: pb.GetSpendRequest, context: Context) -> pb.GetSpendResponse:
        await self._authorize(context)
        started = time.perf_counter()
        try:
            report = await self._guard(context, self._reports.spend(spend_request(request)))
        finally:
            self._metrics.observe_latency("GetSpend", time.perf_counter() - started)
        return spend_response(report)

    async def _decide(
        self, context: Context, rpc: str, request_id: str, call: Awaitable[T]
    ) -> tuple[T, float]:
        """Await a decision-path call, timed into the latency histogram; a failure is
        counted, logged and answered with its status from the error table."""
        started = time.perf_counter()
        try:
            answer = await call
        except BudgetdError as exc:
            seconds = time.perf_counter() - started
            self._metrics.observe_latency(rpc, seconds)
            self._metrics.failure(exc)
            request_log.failure(rpc, request_id, exc, seconds)
            await _abort(context, exc)
        seconds = time.perf_counter() - started
        self._metrics.observe_latency(rpc, seconds)
        return answer, seconds

    async def _guard(self, context: Context, call: Awaitable[T]) -> T:
        """Await an admin call; a domain error becomes its gRPC status from the error table
        (a backend outage is also counted in budgetd_backend_errors_total)."""
        try:
            return await call
        except BudgetdError as exc:
            self._metrics.failure(exc)
            if isinstance(exc, Unavailable):
                log.warning("admin call failed: %s", exc)
            await _abort(context, exc)

    async def _authorize(self, context: Context) -> None:
        """Admin RPCs need the master key; with none configured they are all refused."""
        if self._master_key is None:
            await _abort(context, Unauthenticated(NO_MASTER_KEY))
        metadata = dict(context.invocation_metadata() or ())
        token = bearer_token(_as_str(metadata.get("authorization")))
        if not master_key_matches(token, self._master_key):
            await _abort(context, Unauthenticated(BAD_MASTER_KEY))


async def _abort(context: Context, error: BudgetdError) -> NoReturn:
    await context.abort(grpc_code(error), str(error))
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _as_str(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _usd_or_none(nanos: int | None) -> float | None:
    return None if nanos is None else nanos_to_usd(nanos)


def _ts(instant: float | None) -> timestamp_pb2.Timestamp | None:
    if instant is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(instant * 1_000_000) * 1000)
    return ts


def _ts_or_none(ts: timestamp_pb2.Timestamp) -> float:
    return ts.ToNanoseconds() / 1e9


def _struct(data: dict[str, Any]) -> struct_pb2.Struct | None:
    if not data:
        return None
    out = struct_pb2.Struct()
    out.update(data)
    return out


def _model_budgets_in(given: Any) -> dict[str, ModelBudgetInput]:
    return {
        model: ModelBudgetInput(entry.budget_limit, entry.time_period)
        for model, entry in given.items()
    }


def _model_budgets_out(budgets: Any) -> dict[str, pb.ModelBudget]:
    return {
        model: pb.ModelBudget(budget_limit=nanos_to_usd(b.limit_nanos), time_period=b.duration)
        for model, b in budgets.items()
        if isinstance(b, ModelBudget)
    }


def _member_changes(request: pb.TeamMemberRequest) -> MemberChanges:
    return MemberChanges(
        team_id=request.team_id,
        user_id=request.user_id,
        max_budget=_opt(request, "max_budget"),
        budget_duration=_opt(request, "budget_duration"),
        rpm_limit=_opt(request, "rpm_limit"),
        tpm_limit=_opt(request, "tpm_limit"),
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
        max_budget=_usd_or_none(member.max_budget_nanos),
        budget_duration=member.budget_duration,
        rpm_limit=member.rpm_limit,
        tpm_limit=member.tpm_limit,
        effective_max_budget=_usd_or_none(terms.max_budget_nanos),
        effective_budget_duration=terms.budget_duration,
        effective_rpm_limit=terms.rpm_limit,
        effective_tpm_limit=terms.tpm_limit,
        spend=nanos_to_usd(view.spend_nanos),
        budget_reset_at=_ts(view.budget_reset_at),
        created_at=_ts(member.created_at),
    )


class WireDecisions:
    """:func:`decision_to_pb`, converting a hot-path template once (server.hot).

    Allows from the hot path differ from their template only in ``reservation_id`` and
    ``reserved``: the template's message is kept and copied for each answer.
    """

    def __init__(self) -> None:
        self._forms: TemplateForms[pb.CheckBudgetResponse] = TemplateForms()

    def convert(self, decision: Decision) -> pb.CheckBudgetResponse:
        template = decision.template
        if template is None:
            return decision_to_pb(decision)
        return self.hot(HotAllow(template, decision.reservation_id, decision.reserved_nanos))

    def hot(self, allow: HotAllow) -> pb.CheckBudgetResponse:
        """The wire form of a hot-path allow: a copy of its template's, with its own hold."""
        base = self._forms.get(allow.template)
        if base is None:
            base = self._forms.put(allow.template, decision_to_pb(allow.template))
        answer = pb.CheckBudgetResponse()
        answer.CopyFrom(base)
        answer.reservation_id = allow.reservation_id
        answer.reserved = nanos_to_usd(allow.reserved_nanos)
        return answer


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
        max_budget=_usd_or_none(decision.max_budget_nanos),
        remaining=_usd_or_none(decision.remaining_nanos),
        budget_reset_at=_ts(decision.budget_reset_at),
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
        max_budget=_usd_or_none(team.max_budget_nanos),
        budget_duration=team.budget_duration,
        budget_reset_at=_ts(view.budget_reset_at),
        spend=nanos_to_usd(view.spend_nanos),
        tpm_limit=team.tpm_limit,
        rpm_limit=team.rpm_limit,
        models=list(team.models),
        metadata=_struct(team.metadata),
        blocked=team.blocked,
        created_at=_ts(team.created_at),
        soft_budget=_usd_or_none(team.soft_budget_nanos),
        team_member_budget=_usd_or_none(team.member_budget_nanos),
        team_member_budget_duration=team.member_budget_duration,
        team_member_rpm_limit=team.member_rpm_limit,
        team_member_tpm_limit=team.member_tpm_limit,
        model_max_budget=_model_budgets_out(team.model_max_budget),
    )


def key_to_pb(view: KeyView) -> pb.Key:
    """The wire form of a key (never its plaintext)."""
    key = view.key
    return pb.Key(
        key_id=key.key_id,
        team_id=key.team_id,
        key_alias=key.key_alias,
        max_budget=_usd_or_none(key.max_budget_nanos),
        budget_duration=key.budget_duration,
        budget_reset_at=_ts(view.budget_reset_at),
        spend=nanos_to_usd(view.spend_nanos),
        expires=_ts(key.expires_at),
        models=list(key.models),
        user_id=key.user_id,
        revoked=key.revoked_at is not None,
        created_at=_ts(key.created_at),
        key_prefix=key.key_prefix,
        blocked=key.blocked,
        soft_budget=_usd_or_none(key.soft_budget_nanos),
        rpm_limit=key.rpm_limit,
        tpm_limit=key.tpm_limit,
        model_max_budget=_model_budgets_out(key.model_max_budget),
    )
