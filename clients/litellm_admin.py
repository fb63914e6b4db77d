"""LiteLLM's admin endpoints over budgetd's admin RPCs, with LiteLLM's JSON field names.

The caller's ``Authorization: Bearer <master key>`` is forwarded as gRPC metadata: budgetd
checks it, the bridge holds no master key. As in LiteLLM, unknown request fields are
ignored; a known field of the wrong type is a 400 that names it.

| endpoint | RPC | answer |
|---|---|---|
| ``POST /team/new`` | CreateTeam | the team |
| ``GET /team/info?team_id=`` | GetTeam | ``{"team_id", "team_info": team}`` |
| ``POST /team/update`` | UpdateTeam | ``{"team_id", "data": team}`` |
| ``POST /key/generate`` | IssueKey | the key, with its plaintext ``key`` (shown once) |
| ``GET /key/info?key=`` | GetKey | ``{"key", "info": key}`` |
| ``POST /key/delete`` ``{"keys": [...]}`` | RevokeKey each | ``{"deleted_keys": [...]}`` |
| ``GET /team/list`` | ListTeams (every page) | ``[team, ...]`` |
| ``GET /key/list?team_id=`` | ListKeys (every page) | ``{"keys": [key info], "total_count"}`` |
| ``POST /team/member_add`` | AddTeamMember each | the team, ``updated_team_memberships``, ... |
| ``POST /team/member_update`` | UpdateTeamMember | the membership |
| ``POST /team/member_delete`` | RemoveTeamMember | the team (with ``members_with_roles``) |
| ``POST /team/block``, ``/team/unblock`` | BlockTeam, UnblockTeam | the team |
| ``POST /key/block``, ``/key/unblock`` | BlockKey, UnblockKey | the key's info |

Team members have budgets and rpm/tpm limits but no roles: every member is a ``"user"``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, MutableMapping
from datetime import UTC
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from clients.grpc_client import BudgetdClient, RpcError, pb
from clients.http import HttpError, json_response, read_json_object

_INT64_MAX: Final = 2**63 - 1
_LIST_PAGE: Final = 1000
_LIST_MOST: Final = 10_000  # what one listing answers at most (the admin page shows them all)


class LiteLLMAdmin:
    """The handlers of LiteLLM's team and key endpoints."""

    def __init__(self, client: BudgetdClient, *, max_body_bytes: int) -> None:
        self._client = client
        self._max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the bridge's application."""
        return [
            web.post("/team/new", self.team_new),
            web.get("/team/info", self.team_info),
            web.post("/team/update", self.team_update),
            web.post("/key/generate", self.key_generate),
            web.get("/key/info", self.key_info),
            web.post("/key/delete", self.key_delete),
            web.get("/team/list", self.team_list),
            web.get("/key/list", self.key_list),
            web.post("/team/member_add", self.team_member_add),
            web.post("/team/member_update", self.team_member_update),
            web.post("/team/member_delete", self.team_member_delete),
            web.post("/team/block", self.team_block),
            web.post("/team/unblock", self.team_unblock),
            web.post("/key/block", self.key_block),
            web.post("/key/unblock", self.key_unblock),
        ]

    async def team_new(self, request: web.Request) -> web.Response:
        """``POST /team/new``: create a team; answers it as LiteLLM's team table does."""
        body = await read_json_object(request, self._max_body_bytes)
        create = pb.CreateTeamRequest(
            team_alias=_str(body, "team_alias") or "",
            max_budget=_usd(body, "max_budget"),
            budget_duration=_str(body, "budget_duration") or "",
            team_id=_str(body, "team_id") or "",
            tpm_limit=_int(body, "tpm_limit"),
            rpm_limit=_int(body, "rpm_limit"),
            models=_str_list(body, "models"),
            metadata=_struct(body, "metadata"),
            soft_budget=_usd(body, "soft_budget"),
            team_member_budget=_usd(body, "team_member_budget"),
            team_member_budget_duration=_str(body, "team_member_budget_duration") or "",
            team_member_rpm_limit=_int(body, "team_member_rpm_limit"),
            team_member_tpm_limit=_int(body, "team_member_tpm_limit"),
            blocked=_bool(body, "blocked") or False,
        )
        _set_model_budgets(create.model_max_budget, _model_budgets(body))
        team = await self._client.create_team(create, authorization=_auth(request))
        return json_response(team_json(team))

    async def team_info(self, request: web.Request) -> web.Response:
        """``GET /team/info?team_id=``."""
        team_id = _query(request, "team_id")
        team, members = await self._team_and_members(team_id, _auth(request))
        return json_response(
            {
                "team_id": team.team_id,
                "team_info": team_json(team, members),
                "team_memberships": [member_json(member) for member in members],
            }
        )

    async def team_update(self, request: web.Request) -> web.Response:
        """``POST /team/update``: change the fields given; ``null`` budget means unlimited."""
        body = await read_json_object(request, self._max_body_bytes)
        team_id = _str(body, "team_id")
        if not team_id:
            raise _bad("team_id", "is required")
        update = pb.UpdateTeamRequest(
            team_id=team_id,
            team_alias=_str(body, "team_alias"),
            tpm_limit=_int(body, "tpm_limit", nullable=False),
            rpm_limit=_int(body, "rpm_limit", nullable=False),
            metadata=_struct(body, "metadata"),
            soft_budget=_usd(body, "soft_budget"),
            team_member_budget=_usd(body, "team_member_budget"),
            team_member_rpm_limit=_int(body, "team_member_rpm_limit"),
            team_member_tpm_limit=_int(body, "team_member_tpm_limit"),
            blocked=_bool(body, "blocked", nullable=False),
        )
        # null removes the setting (no soft budget, no default for members).
        for name in (
            "soft_budget",
            "team_member_budget",
            "team_member_rpm_limit",
            "team_member_tpm_limit",
        ):
            if name in body and body[name] is None:
                setattr(update, f"clear_{name}", True)
        # As LiteLLM: a field sent as null is cleared, a field left out is kept.
        if "max_budget" in body:
            budget = _usd(body, "max_budget")
            if budget is None:
                update.clear_max_budget = True
            else:
                update.max_budget = budget
        if "budget_duration" in body:
            update.budget_duration = _str(body, "budget_duration") or "none"
        if "models" in body:
            update.models.extend(_str_list(body, "models"))
            update.update_models = True
        if "team_member_budget_duration" in body:
            # "" (or null) = members' budgets never reset.
            update.team_member_budget_duration = _str(body, "team_member_budget_duration") or ""
        if "model_max_budget" in body:
            # Replaces every per-model budget; {} or null removes them all.
            _set_model_budgets(update.model_max_budget, _model_budgets(body))
            update.update_model_max_budget = True
        team = await self._client.update_team(update, authorization=_auth(request))
        return json_response({"team_id": team.team_id, "data": team_json(team)})

    async def key_generate(self, request: web.Request) -> web.Response:
        """``POST /key/generate``: issue a key for a team; the plaintext is in this answer only."""
        body = await read_json_object(request, self._max_body_bytes)
        issue = pb.IssueKeyRequest(
            team_id=_str(body, "team_id") or "",
            key_alias=_str(body, "key_alias") or "",
            max_budget=_usd(body, "max_budget"),
            budget_duration=_str(body, "budget_duration") or "",
            models=_str_list(body, "models"),
            user_id=_str(body, "user_id") or "",
            # LiteLLM's key lifetime ("30s", "30m", "30h", "30d", "1mo"): budgetd checks it
            # and sets expires from its own clock.
            duration=_str(body, "duration") or "",
            soft_budget=_usd(body, "soft_budget"),
            rpm_limit=_int(body, "rpm_limit"),
            tpm_limit=_int(body, "tpm_limit"),
            blocked=_bool(body, "blocked") or False,
        )
        _set_model_budgets(issue.model_max_budget, _model_budgets(body))
        issued = await self._client.issue_key(issue, authorization=_auth(request))
        return json_response(issued_key_json(issued))

    async def key_info(self, request: web.Request) -> web.Response:
        """``GET /key/info?key=`` (the plaintext key or its key_id)."""
        key = _query(request, "key")
        lookup = _key_lookup(pb.GetKeyRequest, key)
        found = await self._client.get_key(lookup, authorization=_auth(request))
        return json_response({"key": key, "info": key_json(found)})

    async def key_delete(self, request: web.Request) -> web.Response:
        """``POST /key/delete`` with ``{"keys": [...]}``: revoke each (later checks deny it)."""
        body = await read_json_object(request, self._max_body_bytes)
        if body.get("key_aliases") and not body.get("keys"):
            raise _bad("key_aliases", "is not supported by budgetd: pass keys (or key ids)")
        keys = _str_list(body, "keys")
        if not keys:
            raise _bad("keys", "is required: a non-empty list of keys to delete")
        authorization = _auth(request)
        for key in keys:
            await self._client.revoke_key(
                _key_lookup(pb.RevokeKeyRequest, key), authorization=authorization
            )
        return json_response({"deleted_keys": keys})

    async def team_list(self, request: web.Request) -> web.Response:
        """``GET /team/list``: every team (up to 10,000) with its current spend, by team_id."""
        teams: list[dict[str, Any]] = []
        token = ""
        while len(teams) < _LIST_MOST:
            page = await self._client.list_teams(
                pb.ListTeamsRequest(page_size=_LIST_PAGE, page_token=token),
                authorization=_auth(request),
            )
            teams.extend(team_json(team) for team in page.teams)
            token = page.next_page_token
            if not token:
                break
        return json_response(teams[:_LIST_MOST])

    async def key_list(self, request: web.Request) -> web.Response:
        """``GET /key/list[?team_id=][&include_revoked=true]``: keys (never their plaintext)."""
        revoked = request.query.get("include_revoked", "").lower() in ("1", "true", "yes")
        keys: list[dict[str, Any]] = []
        token = ""
        while len(keys) < _LIST_MOST:
            page = await self._client.list_keys(
                pb.ListKeysRequest(
                    team_id=request.query.get("team_id", "").strip(),
                    page_size=_LIST_PAGE,
                    page_token=token,
                    include_revoked=revoked,
                ),
                authorization=_auth(request),
            )
            keys.extend(key_json(key) for key in page.keys)
            token = page.next_page_token
            if not token:
                break
        keys = keys[:_LIST_MOST]
        return json_response({"keys": keys, "total_count": len(keys)})

    async def team_member_add(self, request: web.Request) -> web.Response:
        """``POST /team/member_add``: ``{"team_id", "member": {"role": "user", "user_id"} or a
        list of them, "max_budget_in_team"}``; all are added or (on an error) none."""
        body = await read_json_object(request, self._max_body_bytes)
        team_id = _required(body, "team_id")
        user_ids = _members(body)
        settings = pb.TeamMemberRequest(
            team_id=team_id,
            max_budget=_usd(body, "max_budget_in_team"),
            rpm_limit=_int(body, "rpm_limit"),
            tpm_limit=_int(body, "tpm_limit"),
        )
        duration = _str(body, "budget_duration")
        if duration is not None:
            settings.budget_duration = duration  # "" = the member's budget never resets
        authorization = _auth(request)
        added: list[pb.TeamMember] = []
        try:
            for user_id in user_ids:
                add = pb.TeamMemberRequest()
                add.CopyFrom(settings)
                add.user_id = user_id
                added.append(await self._client.add_team_member(add, authorization=authorization))
        except RpcError as exc:
            # One request: undo the members it added (best effort; not when budgetd is away).
            for member in added if not exc.unreachable else ():
                remove = pb.RemoveTeamMemberRequest(team_id=team_id, user_id=member.user_id)
                with contextlib.suppress(RpcError):
                    await self._client.remove_team_member(remove, authorization=authorization)
            raise
        team, members = await self._team_and_members(team_id, authorization)
        return json_response(
            {
                **team_json(team, members),
                "updated_users": [{"user_id": member.user_id} for member in added],
                "updated_team_memberships": [member_json(member) for member in added],
            }
        )

    async def team_member_update(self, request: web.Request) -> web.Response:
        """``POST /team/member_update``: change a member's own budget and limits; ``null``
        drops the member's own setting (the team's ``team_member_*`` default applies)."""
        body = await read_json_object(request, self._max_body_bytes)
        update = pb.TeamMemberRequest(
            team_id=_required(body, "team_id"), user_id=_member_user_id(body, "")
        )
        if "max_budget_in_team" in body:
            budget = _usd(body, "max_budget_in_team")
            if budget is None:
                update.clear_max_budget = True
            else:
                update.max_budget = budget
        if "rpm_limit" in body:
            rpm = _int(body, "rpm_limit")
            if rpm is None:
                update.clear_rpm_limit = True
            else:
                update.rpm_limit = rpm
        if "tpm_limit" in body:
            tpm = _int(body, "tpm_limit")
            if tpm is None:
                update.clear_tpm_limit = True
            else:
                update.tpm_limit = tpm
        if "budget_duration" in body:
            duration = _str(body, "budget_duration")
            if duration is None:
                update.clear_budget_duration = True  # the team's team_member_budget_duration
            else:
                update.budget_duration = duration
        member = await self._client.update_team_member(update, authorization=_auth(request))
        return json_response({**member_json(member), "user_email": None})

    async def team_member_delete(self, request: web.Request) -> web.Response:
        """``POST /team/member_delete`` ``{"team_id", "user_id"}``: answers the team."""
        body = await read_json_object(request, self._max_body_bytes)
        remove = pb.RemoveTeamMemberRequest(
            team_id=_required(body, "team_id"), user_id=_member_user_id(body, "")
        )
        authorization = _auth(request)
        await self._client.remove_team_member(remove, authorization=authorization)
        team, members = await self._team_and_members(remove.team_id, authorization)
        return json_response(team_json(team, members))

    async def team_block(self, request: web.Request) -> web.Response:
        """``POST /team/block`` ``{"team_id"}``: every request of the team is denied."""
        body = await read_json_object(request, self._max_body_bytes)
        get = pb.GetTeamRequest(team_id=_required(body, "team_id"))
        team = await self._client.block_team(get, authorization=_auth(request))
        return json_response(team_json(team))

    async def team_unblock(self, request: web.Request) -> web.Response:
        """``POST /team/unblock`` ``{"team_id"}``."""
        body = await read_json_object(request, self._max_body_bytes)
        get = pb.GetTeamRequest(team_id=_required(body, "team_id"))
        team = await self._client.unblock_team(get, authorization=_auth(request))
        return json_response(team_json(team))

    async def key_block(self, request: web.Request) -> web.Response:
        """``POST /key/block`` ``{"key"}`` (the plaintext key or its key_id)."""
        body = await read_json_object(request, self._max_body_bytes)
        lookup = _key_lookup(pb.GetKeyRequest, _required(body, "key"))
        key = await self._client.block_key(lookup, authorization=_auth(request))
        return json_response(key_json(key))

    async def key_unblock(self, request: web.Request) -> web.Response:
        """``POST /key/unblock`` ``{"key"}`` (the plaintext key or its key_id)."""
        body = await read_json_object(request, self._max_body_bytes)
        lookup = _key_lookup(pb.GetKeyRequest, _required(body, "key"))
        key = await self._client.unblock_key(lookup, authorization=_auth(request))
        return json_response(key_json(key))

    async def _team_and_members(
        self, team_id: str, authorization: str | None
    ) -> tuple[pb.Team, list[pb.TeamMember]]:
        team = await self._client.get_team(
            pb.GetTeamRequest(team_id=team_id), authorization=authorization
        )
        listed = await self._client.list_team_members(
            pb.ListTeamMembersRequest(team_id=team.team_id), authorization=authorization
        )
        return team, list(listed.members)


# -- answers -----------------------------------------------------------------------------------


def team_json(team: pb.Team, members: list[pb.TeamMember] | None = None) -> dict[str, Any]:
    """A team with LiteLLM's field names (the seed's five first); with ``members``, also
    LiteLLM's ``members_with_roles``."""
    answer = {
        "team_alias": team.team_alias,
        "team_id": team.team_id,
        "max_budget": _opt(team, "max_budget"),
        "budget_duration": team.budget_duration or None,
        "budget_reset_at": _time(team, "budget_reset_at"),
        "spend": team.spend,
        "tpm_limit": _opt(team, "tpm_limit"),
        "rpm_limit": _opt(team, "rpm_limit"),
        "models": list(team.models),
        "metadata": json_format.MessageToDict(team.metadata),
        "blocked": team.blocked,
        "created_at": _time(team, "created_at"),
        "soft_budget": _opt(team, "soft_budget"),
        "team_member_budget": _opt(team, "team_member_budget"),
        "team_member_budget_duration": team.team_member_budget_duration or None,
        "team_member_rpm_limit": _opt(team, "team_member_rpm_limit"),
        "team_member_tpm_limit": _opt(team, "team_member_tpm_limit"),
        "model_max_budget": model_budgets_json(team.model_max_budget),
    }
    if members is not None:
        answer["members_with_roles"] = [
            {"user_id": member.user_id, "user_email": None, "role": "user"} for member in members
        ]
    return answer


def member_json(member: pb.TeamMember) -> dict[str, Any]:
    """A team membership as LiteLLM's ``team_memberships`` entry: ``litellm_budget_table`` is
    what applies to the member; ``max_budget_in_team``, ``budget_duration``, ``rpm_limit`` and
    ``tpm_limit`` are the member's own settings (null: the team's ``team_member_*`` default)."""
    return {
        "user_id": member.user_id,
        "team_id": member.team_id,
        "budget_id": None,
        "spend": member.spend,
        "budget_reset_at": _time(member, "budget_reset_at"),
        "litellm_budget_table": {
            "max_budget": _opt(member, "effective_max_budget"),
            "budget_duration": member.effective_budget_duration or None,
            "rpm_limit": _opt(member, "effective_rpm_limit"),
            "tpm_limit": _opt(member, "effective_tpm_limit"),
        },
        "max_budget_in_team": _opt(member, "max_budget"),
        "budget_duration": _opt(member, "budget_duration"),
        "rpm_limit": _opt(member, "rpm_limit"),
        "tpm_limit": _opt(member, "tpm_limit"),
        "created_at": _time(member, "created_at"),
    }


def model_budgets_json(budgets: Mapping[str, pb.ModelBudget]) -> dict[str, Any]:
    """``model_max_budget`` as LiteLLM writes it: ``{model: {budget_limit, time_period}}``."""
    return {
        model: {"budget_limit": budget.budget_limit, "time_period": budget.time_period or None}
        for model, budget in sorted(budgets.items())
    }


def issued_key_json(issued: pb.IssueKeyResponse) -> dict[str, Any]:
    """``/key/generate``'s answer: LiteLLM's ``team_id`` and ``key`` first."""
    return {
        "team_id": issued.team_id,
        "key": issued.key,
        "key_id": issued.key_id,
        "key_alias": issued.key_alias or None,
        "max_budget": _opt(issued, "max_budget"),
        "budget_duration": issued.budget_duration or None,
        "budget_reset_at": _time(issued, "budget_reset_at"),
        "expires": _time(issued, "expires"),
        "models": list(issued.models),
        "user_id": issued.user_id or None,
        "soft_budget": _opt(issued, "soft_budget"),
        "rpm_limit": _opt(issued, "rpm_limit"),
        "tpm_limit": _opt(issued, "tpm_limit"),
        "model_max_budget": model_budgets_json(issued.model_max_budget),
        "blocked": issued.blocked,
    }


def key_json(key: pb.Key) -> dict[str, Any]:
    """A key's info (never its plaintext); ``key_name`` is its recognisable prefix."""
    return {
        "key_id": key.key_id,
        "key_name": key.key_prefix,
        "key_alias": key.key_alias or None,
        "team_id": key.team_id,
        "max_budget": _opt(key, "max_budget"),
        "budget_duration": key.budget_duration or None,
        "budget_reset_at": _time(key, "budget_reset_at"),
        "spend": key.spend,
        "expires": _time(key, "expires"),
        "models": list(key.models),
        "user_id": key.user_id or None,
        "blocked": key.blocked,
        "revoked": key.revoked,
        "created_at": _time(key, "created_at"),
        "soft_budget": _opt(key, "soft_budget"),
        "rpm_limit": _opt(key, "rpm_limit"),
        "tpm_limit": _opt(key, "tpm_limit"),
        "model_max_budget": model_budgets_json(key.model_max_budget),
    }


def iso_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as LiteLLM writes them: ``2024-06-14T00:00:00.000000Z``."""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _opt(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _time(message: Any, name: str) -> str | None:
    return iso_time(getattr(message, name)) if message.HasField(name) else None


# -- request fields ----------------------------------------------------------------------------


def _auth(request: web.Request) -> str | None:
    return request.headers.get("authorization")


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name, "").strip()
    if not value:
        raise _bad(name, f"is required: add ?{name}=... to the URL")
    return value


def _key_lookup(kind: Any, key: str) -> Any:
    # Plaintext keys start with "sk-"; anything else is taken as a key_id (LiteLLM also
    # accepts its own hashed token there, which budgetd does not have).
    return kind(key=key) if key.startswith("sk-") else kind(key_id=key)


def _str(body: dict[str, Any], name: str, *, label: str = "") -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(label + name, f"must be a string (got {_kind(value)})")
    return value


def _required(body: dict[str, Any], name: str) -> str:
    value = _str(body, name)
    if not value:
        raise _bad(name, "is required")
    return value


def _usd(
    body: dict[str, Any], name: str, *, nullable: bool = True, label: str = ""
) -> float | None:
    if name in body and body[name] is None and not nullable:
        raise _bad(label + name, "cannot be cleared with null through budgetd; give a number")
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(label + name, f"must be a number in USD (got {_kind(value)})")
    return float(value)


def _bool(body: dict[str, Any], name: str, *, nullable: bool = True) -> bool | None:
    if name in body and body[name] is None and not nullable:
        raise _bad(name, "cannot be cleared with null; give true or false")
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"must be true or false (got {_kind(value)})")
    return value


def _model_budgets(body: dict[str, Any]) -> dict[str, pb.ModelBudget]:
    """LiteLLM's ``model_max_budget``: ``{model: {"budget_limit", "time_period"}}`` (also its
    ``max_budget``/``budget_duration`` spellings, or a bare number: a budget that never resets)."""
    value = body.get("model_max_budget")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad("model_max_budget", f"must be a JSON object (got {_kind(value)})")
    budgets: dict[str, pb.ModelBudget] = {}
    for model, given in value.items():
        label = f"model_max_budget.{model}"
        bare = isinstance(given, int | float) and not isinstance(given, bool)
        entry = {"budget_limit": given} if bare else given
        if not isinstance(entry, dict):
            raise _bad(
                label, f'must be {{"budget_limit": USD, "time_period": "1d"}} (got {_kind(entry)})'
            )
        limit_name = "max_budget" if "budget_limit" not in entry else "budget_limit"
        period_name = "budget_duration" if "time_period" not in entry else "time_period"
        limit = _usd(entry, limit_name, label=label + ".")
        if limit is None:
            raise _bad(f"{label}.budget_limit", "is required")
        period = _str(entry, period_name, label=label + ".") or ""
        budgets[model] = pb.ModelBudget(budget_limit=limit, time_period=period)
    return budgets


def _set_model_budgets(
    target: MutableMapping[str, pb.ModelBudget], budgets: dict[str, pb.ModelBudget]
) -> None:
    for model, budget in budgets.items():
        target[model].CopyFrom(budget)


def _members(body: dict[str, Any]) -> list[str]:
    """The user ids of ``/team/member_add``'s ``member`` (one object or a list of them)."""
    value = body.get("member")
    if value is None:
        raise _bad("member", 'is required: {"role": "user", "user_id": "..."} or a list of them')
    entries = value if isinstance(value, list) else [value]
    if not entries:
        raise _bad("member", "must not be an empty list")
    user_ids: list[str] = []
    for index, entry in enumerate(entries):
        label = f"member[{index}]" if isinstance(value, list) else "member"
        if not isinstance(entry, dict):
            raise _bad(label, f'must be {{"role": "user", "user_id": "..."}} (got {_kind(entry)})')
        role = _str(entry, "role", label=label + ".")
        if role not in (None, "user"):
            raise _bad(
                f"{label}.role",
                f"{role!r} is not supported by budgetd: team members have budgets, not roles "
                '(add them as "user")',
            )
        user_id = _member_user_id(entry, label + ".")
        if user_id in user_ids:
            raise _bad(f"{label}.user_id", f"{user_id!r} is listed twice")
        user_ids.append(user_id)
    return user_ids


def _member_user_id(body: dict[str, Any], label: str) -> str:
    user_id = _str(body, "user_id", label=label)
    if user_id:
        return user_id
    if body.get("user_email"):
        raise _bad(
            label + "user_id",
            "is required: budgetd identifies team members by user_id (user_email is not supported)",
        )
    raise _bad(label + "user_id", "is required")


def _int(body: dict[str, Any], name: str, *, nullable: bool = True) -> int | None:
    if name in body and body[name] is None and not nullable:
        raise _bad(name, "cannot be cleared with null through budgetd; give a number")
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
        raise _bad(name, f"must be a whole number from 0 (got {_kind(value)})")
    return value


def _str_list(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _bad(name, "must be a list of strings")
    return value


def _struct(body: dict[str, Any], name: str) -> struct_pb2.Struct | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(name, f"must be a JSON object (got {_kind(value)})")
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _kind(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"{value!r}"
    )


def _bad(param: str, problem: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, f"{param} {problem}", param=param)
