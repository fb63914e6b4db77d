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
"""

from __future__ import annotations

import math
import re
import time
from datetime import UTC
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from clients.grpc_client import BudgetdClient, pb
from clients.http import HttpError, json_response, read_json_object

_KEY_DURATION: Final = re.compile(r"^(\d+)([smhd])$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
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
        )
        team = await self._client.create_team(create, authorization=_auth(request))
        return json_response(team_json(team))

    async def team_info(self, request: web.Request) -> web.Response:
        """``GET /team/info?team_id=``."""
        team_id = _query(request, "team_id")
        get = pb.GetTeamRequest(team_id=team_id)
        team = await self._client.get_team(get, authorization=_auth(request))
        return json_response({"team_id": team.team_id, "team_info": team_json(team)})

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
        )
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
            expires=_expires(body),
            models=_str_list(body, "models"),
            user_id=_str(body, "user_id") or "",
        )
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


# -- answers -----------------------------------------------------------------------------------


def team_json(team: pb.Team) -> dict[str, Any]:
    """A team with LiteLLM's field names (the seed's five first)."""
    return {
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
        "blocked": key.revoked,
        "created_at": _time(key, "created_at"),
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


def _expires(body: dict[str, Any]) -> timestamp_pb2.Timestamp | None:
    """LiteLLM's ``duration`` ("30s", "30m", "30h", "30d"): the key expires that long from now."""
    duration = _str(body, "duration")
    if not duration:
        return None
    match = _KEY_DURATION.match(duration)
    if not match:
        raise _bad("duration", f"must be like 30s, 30m, 30h or 30d (got {duration!r})")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    expires = timestamp_pb2.Timestamp()
    try:
        expires.FromNanoseconds(int((time.time() + seconds) * 1e9))
    except (OverflowError, ValueError):
        raise _bad("duration", f"is too long (got {duration!r})") from None
    return expires


def _str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(name, f"must be a string (got {_kind(value)})")
    return value


def _usd(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"must be a number in USD (got {_kind(value)})")
    return float(value)


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
