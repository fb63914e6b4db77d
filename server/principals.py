"""Who is asking: a CheckBudget credential (API key or JWT) resolved to a Principal.

An API key names its team (and possibly its user). A JWT is verified (see
:mod:`server.jwt_auth`) and names a team in a claim; with ``team_id_upsert`` a team the
database does not know yet is created on first use with ``default_team_settings``, once,
however many replicas see it at the same instant (the store's insert-if-absent decides). Any
problem with the credential is a denial, never an error status and never an allow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from server import validation
from server.decision import CheckRequest, Decision, Reason, refusal
from server.errors import InvalidArgument
from server.identity import hash_api_key
from server.jwt_types import JwtIdentity, JwtInvalid
from server.scopes import Principal
from server.settings import DefaultTeamSettings
from server.storage.base import KeyRecord, RecordStore, ScopeKind, TeamRecord

log = logging.getLogger("budgetd.principals")

DEFAULT_SETTINGS_ID = "default-settings"


class JwtCheck(Protocol):
    """What resolving a JWT needs from the verifier."""

    async def verify(self, token: str) -> JwtIdentity: ...


class Principals:
    """Resolves credentials against the record store."""

    def __init__(
        self,
        records: RecordStore,
        *,
        jwt: JwtCheck | None = None,
        team_id_upsert: bool = False,
        default_teams: Sequence[DefaultTeamSettings] = (),
    ) -> None:
        self._records = records
        self._jwt = jwt
        self._upsert = team_id_upsert
        self._defaults = {entry.team_id: entry for entry in default_teams}

    async def resolve(self, req: CheckRequest, now: float) -> Principal | Decision:
        """The principal of a CheckBudget request, or the denial that stops it."""
        user_id = validation.text(req.user_id, "user_id", limit=validation.MAX_ID)
        found: tuple[TeamRecord, KeyRecord | None, str] | Decision
        if req.jwt and not req.api_key:
            found = await self._from_jwt(req.jwt, now)
        else:
            found = await self._from_key(req.api_key, now)
        if isinstance(found, Decision):
            return found
        team, key, claimed_user = found
        if team.blocked:
            return refusal(
                Reason.TEAM_BLOCKED,
                f"Team={team.team_id} is blocked. Update via /team/unblock if you are admin.",
                key,
                ScopeKind.TEAM,
                team_id=team.team_id,
            )
        # An authenticated user (the key's owner, the JWT's subject) wins over one the
        # gateway passes along: the caller cannot move its spend to somebody else.
        user = claimed_user or user_id
        member = await self._records.get_member(team.team_id, user) if user else None
        return Principal(team=team, key=key, user_id=user, member=member)

    async def for_spend(self, team_id: str, key_id: str, user_id: str) -> Principal | None:
        """The principal a recorded spend is charged to (None: its team or key is gone)."""
        team = await self._records.get_team(team_id)
        if team is None:
            return None
        key = None
        if key_id:
            key = await self._records.get_key(key_id)
            if key is None:
                return None
        member = await self._records.get_member(team_id, user_id) if user_id else None
        return Principal(team=team, key=key, user_id=user_id, member=member)

    async def _from_key(
        self, api_key: str, now: float
    ) -> tuple[TeamRecord, KeyRecord, str] | Decision:
        if not api_key:
            return refusal(Reason.KEY_INVALID, "No API key passed in the request.")
        if len(api_key) > validation.MAX_TEXT:
            return refusal(Reason.KEY_INVALID, "Invalid API key.")
        key = await self._records.get_key_by_hash(hash_api_key(api_key))
        if key is None:
            return refusal(Reason.KEY_INVALID, "Invalid API key.")
        if key.revoked_at is not None:
            return refusal(Reason.KEY_INVALID, "API key has been revoked.", key)
        if key.expires_at is not None and key.expires_at <= now:
            return refusal(Reason.KEY_EXPIRED, "Authentication Error - Expired Key.", key)
        if key.blocked:
            return refusal(
                Reason.KEY_BLOCKED,
                "Authentication Error - Key is blocked. Update via /key/unblock if you are admin.",
                key,
            )
        team = await self._records.get_team(key.team_id)
        if team is None:
            return refusal(Reason.KEY_INVALID, "API key's team no longer exists.", key)
        return team, key, key.user_id

    async def _from_jwt(self, token: str, now: float) -> tuple[TeamRecord, None, str] | Decision:
        if self._jwt is None:
            return _jwt_refusal(
                "JWT authentication is not enabled (general_settings.enable_jwt_auth)"
            )
        if len(token) > validation.MAX_JWT:
            return _jwt_refusal(f"JWT is longer than {validation.MAX_JWT} characters")
        try:
            identity = await self._jwt.verify(token)
        except JwtInvalid as exc:
            return _jwt_refusal(str(exc))
        if not identity.team_id:
            return _jwt_refusal("JWT names no team (litellm_jwtauth.team_id_jwt_field)")
        try:
            validation.identifier(identity.team_id, "the JWT's team id")
            validation.text(identity.user_id, "the JWT's user id", limit=validation.MAX_ID)
        except InvalidArgument as exc:
            return _jwt_refusal(str(exc))
        team = await self._records.get_team(identity.team_id)
        if team is None:
            if not self._upsert:
                return _jwt_refusal(
                    f"Team {identity.team_id!r} from the JWT does not exist"
                    " (set litellm_jwtauth.team_id_upsert: true to create teams on first use)"
                )
            team = await self._upsert_team(identity.team_id, now)
        return team, None, identity.user_id

    async def _upsert_team(self, team_id: str, now: float) -> TeamRecord:
        """Create a team named by a JWT with ``default_team_settings``; exactly once."""
        entry = self._defaults.get(team_id) or self._defaults.get(DEFAULT_SETTINGS_ID)
        team = new_team_from_defaults(team_id, entry, now)
        stored, created = await self._records.create_team_if_absent(team)
        if created:
            log.info("created team %s on its first JWT (default_team_settings)", team_id)
        return stored


def new_team_from_defaults(
    team_id: str, entry: DefaultTeamSettings | None, now: float
) -> TeamRecord:
    """The team a JWT upsert creates: every field of the ``default_team_settings`` entry."""
    if entry is None:
        return TeamRecord(team_id, team_id, None, "", created_at=now)
    return TeamRecord(
        team_id=team_id,
        team_alias=entry.team_alias or team_id,
        max_budget_nanos=validation.budget(entry.max_budget),
        budget_duration=validation.duration_text(entry.budget_duration),
        tpm_limit=entry.tpm_limit,
        rpm_limit=entry.rpm_limit,
        models=entry.models,
        member_budget_nanos=validation.budget(entry.team_member_budget, "team_member_budget"),
        member_budget_duration=validation.duration_text(entry.team_member_budget_duration),
        member_rpm_limit=entry.team_member_rpm_limit,
        member_tpm_limit=entry.team_member_tpm_limit,
        created_at=now,
    )


def _jwt_refusal(message: str) -> Decision:
    return refusal(Reason.JWT_INVALID, message, None, None)
