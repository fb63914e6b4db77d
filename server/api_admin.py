"""The admin RPCs of budgetd.v1.BudgetAuthority: everything that needs the master key.

Split from server/api.py as AdminRpcs, a mixin the servicer (server.api's
BudgetAuthorityService) inherits, so every RPC is still an attribute of the one servicer
object that server/app.py registers, and the decision RPCs (CheckBudget, RecordSpend) and
their helpers stay in server/api.py untouched. Here: teams, keys, members, blocking and
GetSpend, with the master-key check (_authorize) and the admin calls' error handling
(_guard). Wire conversions come from server/api_wire.py and server/api_reports.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from google.protobuf import json_format

from server.admin import Admin, NewKey, NewTeam, TeamChanges
from server.api_reports import list_keys_request, spend_request, spend_response
from server.api_wire import (
    Context,
    abort,
    key_to_pb,
    member_changes,
    member_to_pb,
    model_budgets_in,
    model_budgets_out,
    opt,
    team_to_pb,
    ts,
    ts_or_none,
    usd_or_none,
)
from server.errors import BudgetdError, Unauthenticated, Unavailable
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.identity import bearer_token, master_key_matches
from server.metrics import Metrics
from server.reports import SpendReports

T = TypeVar("T")
log = logging.getLogger("budgetd.api")

NO_MASTER_KEY = (
    "admin calls are refused: no master key is configured. Set BUDGETD_MASTER_KEY (or "
    "LITELLM_MASTER_KEY, or general_settings.master_key in the config file) and restart "
    "budgetd; then send 'authorization: Bearer <master key>'"
)
BAD_MASTER_KEY = "admin calls need metadata 'authorization: Bearer <master key>'"


class AdminRpcs:
    """The admin RPCs of the servicer; its __init__ sets the attributes declared here."""

    _admin: Admin
    _master_key: str | None
    _metrics: Metrics
    _reports: SpendReports

    async def CreateTeam(self, request: pb.CreateTeamRequest, context: Context) -> pb.Team:
        await self._authorize(context)
        req = NewTeam(
            team_alias=request.team_alias,
            max_budget=opt(request, "max_budget"),
            budget_duration=request.budget_duration,
            team_id=request.team_id,
            tpm_limit=opt(request, "tpm_limit"),
            rpm_limit=opt(request, "rpm_limit"),
            models=list(request.models),
            metadata=json_format.MessageToDict(request.metadata),
            soft_budget=opt(request, "soft_budget"),
            team_member_budget=opt(request, "team_member_budget"),
            team_member_budget_duration=request.team_member_budget_duration,
            team_member_rpm_limit=opt(request, "team_member_rpm_limit"),
            team_member_tpm_limit=opt(request, "team_member_tpm_limit"),
            model_max_budget=model_budgets_in(request.model_max_budget),
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
            team_alias=opt(request, "team_alias"),
            max_budget=opt(request, "max_budget"),
            clear_max_budget=request.clear_max_budget,
            budget_duration=opt(request, "budget_duration"),
            tpm_limit=opt(request, "tpm_limit"),
            rpm_limit=opt(request, "rpm_limit"),
            models=list(request.models) if request.update_models else None,
            metadata=json_format.MessageToDict(request.metadata)
            if request.HasField("metadata")
            else None,
            soft_budget=opt(request, "soft_budget"),
            team_member_budget=opt(request, "team_member_budget"),
            team_member_budget_duration=opt(request, "team_member_budget_duration"),
            team_member_rpm_limit=opt(request, "team_member_rpm_limit"),
            team_member_tpm_limit=opt(request, "team_member_tpm_limit"),
            model_max_budget=model_budgets_in(request.model_max_budget)
            if request.update_model_max_budget or request.model_max_budget
            else None,
            blocked=opt(request, "blocked"),
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
            max_budget=opt(request, "max_budget"),
            budget_duration=request.budget_duration,
            expires=ts_or_none(request.expires) if request.HasField("expires") else None,
            models=list(request.models),
            user_id=request.user_id,
            duration=request.duration,
            soft_budget=opt(request, "soft_budget"),
            rpm_limit=opt(request, "rpm_limit"),
            tpm_limit=opt(request, "tpm_limit"),
            model_max_budget=model_budgets_in(request.model_max_budget),
            blocked=request.blocked,
        )
        issued = await self._guard(context, self._admin.issue_key(req))
        key = issued.view.key
        return pb.IssueKeyResponse(
            key=issued.plaintext,
            key_id=key.key_id,
            team_id=key.team_id,
            key_alias=key.key_alias,
            max_budget=usd_or_none(key.max_budget_nanos),
            budget_duration=key.budget_duration,
            budget_reset_at=ts(issued.view.budget_reset_at),
            expires=ts(key.expires_at),
            models=list(key.models),
            user_id=key.user_id,
            soft_budget=usd_or_none(key.soft_budget_nanos),
            rpm_limit=key.rpm_limit,
            tpm_limit=key.tpm_limit,
            model_max_budget=model_budgets_out(key.model_max_budget),
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
        view = await self._guard(context, self._admin.add_member(member_changes(request)))
        return member_to_pb(view)

    async def UpdateTeamMember(
        self, request: pb.TeamMemberRequest, context: Context
    ) -> pb.TeamMember:
        await self._authorize(context)
        view = await self._guard(context, self._admin.update_member(member_changes(request)))
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

    async def _guard(self, context: Context, call: Awaitable[T]) -> T:
        """Await an admin call; a domain error becomes its gRPC status from the error table
        (a backend outage is also counted in budgetd_backend_errors_total)."""
        try:
            return await call
        except BudgetdError as exc:
            self._metrics.failure(exc)
            if isinstance(exc, Unavailable):
                log.warning("admin call failed: %s", exc)
            await abort(context, exc)

    async def _authorize(self, context: Context) -> None:
        """Admin RPCs need the master key; with none configured they are all refused."""
        if self._master_key is None:
            await abort(context, Unauthenticated(NO_MASTER_KEY))
        metadata = dict(context.invocation_metadata() or ())
        token = bearer_token(_as_str(metadata.get("authorization")))
        if not master_key_matches(token, self._master_key):
            await abort(context, Unauthenticated(BAD_MASTER_KEY))


def _as_str(value: str | bytes | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
