"""The admin path: teams and keys. Authorisation (the master key) is checked by the caller."""

from __future__ import annotations

import calendar
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, tzinfo
from typing import Any

from server import validation
from server.clock import Clock
from server.errors import AlreadyExists, InvalidArgument, NotFound
from server.identity import generate_api_key, hash_api_key, key_display_prefix, new_id
from server.ledger_sync import read_states
from server.scopes import MemberTerms, key_scope, member_scope, member_terms, team_scope
from server.storage.base import (
    CounterStore,
    KeyRecord,
    MemberRecord,
    ModelBudget,
    RecordStore,
    ScopeBudget,
    TeamRecord,
)
from server.windows import Duration

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class TeamView:
    """A team with its spend in the current window and when that window resets."""

    team: TeamRecord
    spend_nanos: int
    budget_reset_at: float | None


@dataclass(frozen=True, slots=True)
class KeyView:
    """A key (never its plaintext) with its spend in the current window."""

    key: KeyRecord
    spend_nanos: int
    budget_reset_at: float | None


@dataclass(frozen=True, slots=True)
class MemberView:
    """A team member: own settings, what applies, and the spend in its window."""

    member: MemberRecord
    terms: MemberTerms
    spend_nanos: int
    budget_reset_at: float | None


@dataclass(frozen=True, slots=True)
class ModelBudgetInput:
    """A ``model_max_budget`` entry as given (USD, a budget_duration)."""

    budget_limit: float
    time_period: str = ""


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A newly issued key: the plaintext is here and nowhere else, ever."""

    plaintext: str
    view: KeyView


@dataclass(frozen=True, slots=True)
class NewTeam:
    team_alias: str
    max_budget: float | None = None
    budget_duration: str = ""
    team_id: str = ""
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    models: Sequence[str] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)
    soft_budget: float | None = None
    team_member_budget: float | None = None
    team_member_budget_duration: str = ""
    team_member_rpm_limit: int | None = None
    team_member_tpm_limit: int | None = None
    model_max_budget: Mapping[str, ModelBudgetInput] = field(default_factory=dict)
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class TeamChanges:
    """Fields to change on a team; None leaves a field as it is."""

    team_id: str
    team_alias: str | None = None
    max_budget: float | None = None
    clear_max_budget: bool = False
    budget_duration: str | None = None  # "none" removes the reset
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    models: Sequence[str] | None = None
    metadata: Mapping[str, Any] | None = None
    soft_budget: float | None = None
    team_member_budget: float | None = None
    team_member_budget_duration: str | None = None
    team_member_rpm_limit: int | None = None
    team_member_tpm_limit: int | None = None
    model_max_budget: Mapping[str, ModelBudgetInput] | None = None
    blocked: bool | None = None
    clear_soft_budget: bool = False
    clear_team_member_budget: bool = False
    clear_team_member_rpm_limit: bool = False
    clear_team_member_tpm_limit: bool = False


@dataclass(frozen=True, slots=True)
class NewKey:
    team_id: str
    key_alias: str = ""
    max_budget: float | None = None
    budget_duration: str = ""
    expires: float | None = None
    models: Sequence[str] = ()
    user_id: str = ""
    duration: str = ""  # lifetime relative to now, instead of expires
    soft_budget: float | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    model_max_budget: Mapping[str, ModelBudgetInput] = field(default_factory=dict)
    blocked: bool = False


@dataclass(frozen=True, slots=True)
class MemberChanges:
    """A member's own settings to set (add) or change (update); None leaves a field."""

    team_id: str
    user_id: str
    max_budget: float | None = None
    budget_duration: str | None = None  # "" = the budget never resets
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    clear_max_budget: bool = False
    clear_rpm_limit: bool = False
    clear_tpm_limit: bool = False
    clear_budget_duration: bool = False  # back to the team's team_member_budget_duration


class Admin:
    """Creates, reads and changes teams and keys; every input is checked before a write."""

    def __init__(
        self, records: RecordStore, counters: CounterStore, clock: Clock, *, tz: tzinfo
    ) -> None:
        self._records = records
        self._counters = counters
        self._clock = clock
        self._tz = tz

    async def create_team(self, req: NewTeam) -> TeamView:
        team = TeamRecord(
            team_id=validation.identifier(req.team_id, "team_id", required=False)
            or str(uuid.uuid4()),
            team_alias=validation.text(req.team_alias, "team_alias"),
            max_budget_nanos=validation.budget(req.max_budget),
            budget_duration=validation.duration_text(req.budget_duration),
            tpm_limit=validation.limit(req.tpm_limit, "tpm_limit"),
            rpm_limit=validation.limit(req.rpm_limit, "rpm_limit"),
            models=validation.models(req.models),
            metadata=validation.metadata(req.metadata),
            created_at=self._clock.now(),
            blocked=req.blocked,
            soft_budget_nanos=validation.budget(req.soft_budget, "soft_budget"),
            member_budget_nanos=validation.budget(req.team_member_budget, "team_member_budget"),
            member_budget_duration=validation.duration_text(
                req.team_member_budget_duration, "team_member_budget_duration"
            ),
            member_rpm_limit=validation.limit(req.team_member_rpm_limit, "team_member_rpm_limit"),
            member_tpm_limit=validation.limit(req.team_member_tpm_limit, "team_member_tpm_limit"),
            model_max_budget=_model_budgets(req.model_max_budget),
        )
        return await self._team_view(await self._records.create_team(team))

    async def get_team(self, team_id: str) -> TeamView:
        return await self._team_view(await self._team(team_id))

    async def list_teams(self, page_size: int, page_token: str) -> tuple[list[TeamView], str]:
        """A page of teams ordered by id, and the token of the next page ("" at the end)."""
        size = _page_size(page_size)
        validation.text(page_token, "page_token", limit=validation.MAX_ID)
        teams = await self._records.list_teams(page_token, size + 1)
        next_token = teams[size - 1].team_id if len(teams) > size else ""
        return [await self._team_view(t) for t in teams[:size]], next_token

    async def update_team(self, req: TeamChanges) -> TeamView:
        team = await self._team(req.team_id)
        changes = _team_changes(req) | _team_limit_changes(req)
        return await self._team_view(await self._records.update_team(replace(team, **changes)))

    async def set_team_blocked(self, team_id: str, blocked: bool) -> TeamView:
        """Block (every request of the team is denied) or unblock a team."""
        return await self.update_team(TeamChanges(team_id=team_id, blocked=blocked))

    async def set_key_blocked(self, blocked: bool, key_id: str = "", key: str = "") -> KeyView:
        """Block (its requests are denied with KEY_BLOCKED) or unblock a key."""
        found = await self._find_key(key_id, key)
        return await self._key_view(await self._records.update_key(replace(found, blocked=blocked)))

    # -- team members ---------------------------------------------------------------------

    async def add_member(self, req: MemberChanges) -> MemberView:
        """Add a user to a team, with their own settings (unset: the team's defaults)."""
        team = await self._team(req.team_id)
        user_id = validation.identifier(req.user_id, "user_id")
        if await self._records.get_member(team.team_id, user_id) is not None:
            raise AlreadyExists(f"user {user_id!r} is already a member of team {team.team_id!r}")
        member = _member_changed(
            MemberRecord(team.team_id, user_id, created_at=self._clock.now()), req
        )
        return await self._member_view(team, await self._records.upsert_member(member))

    async def update_member(self, req: MemberChanges) -> MemberView:
        """Change a member's own settings; NOT_FOUND when the user is not a member."""
        team = await self._team(req.team_id)
        current = await self._member(team.team_id, req.user_id)
        member = _member_changed(current, req)
        return await self._member_view(team, await self._records.upsert_member(member))

    async def remove_member(self, team_id: str, user_id: str) -> MemberView:
        """Remove a member (their spend stays in the ledger); the removed member's view."""
        team = await self._team(team_id)
        current = await self._member(team.team_id, user_id)
        view = await self._member_view(team, current)
        await self._records.delete_member(team.team_id, current.user_id)
        return view

    async def list_members(self, team_id: str) -> list[MemberView]:
        team = await self._team(team_id)
        return [await self._member_view(team, m) for m in await self._records.list_members(team_id)]

    async def _member(self, team_id: str, user_id: str) -> MemberRecord:
        validation.identifier(user_id, "user_id")
        member = await self._records.get_member(team_id, user_id)
        if member is None:
            raise NotFound(f"user {user_id!r} is not a member of team {team_id!r}")
        return member

    async def _member_view(self, team: TeamRecord, member: MemberRecord) -> MemberView:
        scope = member_scope(team, member.user_id, member, self._clock.now(), self._tz)
        spend = await self._spend(team.team_id, scope)
        return MemberView(member, member_terms(team, member), spend, _reset_at(scope))

    async def issue_key(self, req: NewKey) -> IssuedKey:
        now = self._clock.now()
        validation.identifier(req.team_id, "team_id")
        expires = validation.instant(req.expires, "expires")
        if req.duration:
            if expires is not None:
                raise InvalidArgument("give expires or duration, not both")
            lifetime = validation.duration(req.duration, "duration")
            if lifetime is None:
                raise InvalidArgument(
                    f"duration must be a lifetime such as 30d, got {req.duration!r}"
                )
            expires = _lifetime_end(lifetime, now)
        if expires is not None and expires <= now:
            raise InvalidArgument("expires must be in the future")
        plaintext = generate_api_key()
        key = KeyRecord(
            key_id=new_id("key"),
            key_hash=hash_api_key(plaintext),
            key_prefix=key_display_prefix(plaintext),
            team_id=req.team_id,
            key_alias=validation.text(req.key_alias, "key_alias"),
            max_budget_nanos=validation.budget(req.max_budget),
            budget_duration=validation.duration_text(req.budget_duration),
            expires_at=expires,
            models=validation.models(req.models),
            user_id=validation.text(req.user_id, "user_id", limit=validation.MAX_ID),
            created_at=now,
            blocked=req.blocked,
            soft_budget_nanos=validation.budget(req.soft_budget, "soft_budget"),
            rpm_limit=validation.limit(req.rpm_limit, "rpm_limit"),
            tpm_limit=validation.limit(req.tpm_limit, "tpm_limit"),
            model_max_budget=_model_budgets(req.model_max_budget),
        )
        stored = await self._records.insert_key(key)
        return IssuedKey(plaintext, await self._key_view(stored))

    async def get_key(self, key_id: str = "", key: str = "") -> KeyView:
        return await self._key_view(await self._find_key(key_id, key))

    async def revoke_key(self, key_id: str = "", key: str = "") -> KeyView:
        found = await self._find_key(key_id, key)
        revoked = await self._records.revoke_key(found.key_id, self._clock.now())
        if revoked is None:
            raise NotFound(f"key {found.key_id!r} not found")
        return await self._key_view(revoked)

    async def list_keys(
        self, team_id: str, page_size: int, page_token: str, *, include_revoked: bool = False
    ) -> tuple[list[KeyView], str]:
        """A page of keys ordered by key_id (one team's, or all), and the next page's token."""
        if team_id:
            await self._team(team_id)  # an unknown team is NOT_FOUND, not an empty list
        size = _page_size(page_size)
        validation.text(page_token, "page_token", limit=validation.MAX_ID)
        keys = await self._records.list_keys(
            team_id, page_token, size + 1, include_revoked=include_revoked
        )
        next_token = keys[size - 1].key_id if len(keys) > size else ""
        return await self._key_views(keys[:size]), next_token

    async def _key_views(self, keys: list[KeyRecord]) -> list[KeyView]:
        """Views of many keys, reading each team's counters once for all its keys."""
        now = self._clock.now()
        scopes = {key.key_id: key_scope(key, now, self._tz) for key in keys}
        spend: dict[str, int] = {}
        for team_id in dict.fromkeys(key.team_id for key in keys):
            mine = [scopes[key.key_id] for key in keys if key.team_id == team_id]
            states = await read_states(self._records, self._counters, team_id, mine, now)
            spend.update((s.scope_id, state.spend) for s, state in zip(mine, states, strict=True))
        return [KeyView(key, spend[key.key_id], _reset_at(scopes[key.key_id])) for key in keys]

    async def _team(self, team_id: str) -> TeamRecord:
        validation.identifier(team_id, "team_id")
        team = await self._records.get_team(team_id)
        if team is None:
            raise NotFound(f"team {team_id!r} not found")
        return team

    async def _find_key(self, key_id: str, key: str) -> KeyRecord:
        if key_id:
            validation.identifier(key_id, "key_id")
            found = await self._records.get_key(key_id)
        elif key:
            validation.text(key, "key")
            found = await self._records.get_key_by_hash(hash_api_key(key))
        else:
            raise InvalidArgument("key_id or key is required")
        if found is None:
            raise NotFound("key not found")
        return found

    async def _team_view(self, team: TeamRecord) -> TeamView:
        scope = team_scope(team, self._clock.now(), self._tz)
        return TeamView(team, await self._spend(team.team_id, scope), _reset_at(scope))

    async def _key_view(self, key: KeyRecord) -> KeyView:
        scope = key_scope(key, self._clock.now(), self._tz)
        return KeyView(key, await self._spend(key.team_id, scope), _reset_at(scope))

    async def _spend(self, team_id: str, scope: ScopeBudget) -> int:
        states = await read_states(
            self._records, self._counters, team_id, [scope], self._clock.now()
        )
        return states[0].spend


def _team_changes(req: TeamChanges) -> dict[str, Any]:
    """The TeamRecord fields an update of alias, budget, limits, models or metadata sets."""
    changes: dict[str, Any] = {}
    if req.team_alias is not None:
        changes["team_alias"] = validation.text(req.team_alias, "team_alias")
    if req.clear_max_budget:
        changes["max_budget_nanos"] = None
    elif req.max_budget is not None:
        changes["max_budget_nanos"] = validation.budget(req.max_budget)
    if req.budget_duration:
        none = req.budget_duration == "none"
        changes["budget_duration"] = "" if none else validation.duration_text(req.budget_duration)
    if req.tpm_limit is not None:
        changes["tpm_limit"] = validation.limit(req.tpm_limit, "tpm_limit")
    if req.rpm_limit is not None:
        changes["rpm_limit"] = validation.limit(req.rpm_limit, "rpm_limit")
    if req.models is not None:
        changes["models"] = validation.models(req.models)
    if req.metadata is not None:
        changes["metadata"] = validation.metadata(req.metadata)
    return changes


def _team_limit_changes(req: TeamChanges) -> dict[str, Any]:
    """The TeamRecord fields an update of soft/member/model budgets or blocking sets."""
    changes: dict[str, Any] = {}
    if req.clear_soft_budget:
        changes["soft_budget_nanos"] = None
    elif req.soft_budget is not None:
        changes["soft_budget_nanos"] = validation.budget(req.soft_budget, "soft_budget")
    if req.clear_team_member_budget:
        changes["member_budget_nanos"] = None
    elif req.team_member_budget is not None:
        changes["member_budget_nanos"] = validation.budget(
            req.team_member_budget, "team_member_budget"
        )
    if req.team_member_budget_duration is not None:
        changes["member_budget_duration"] = validation.duration_text(
            req.team_member_budget_duration, "team_member_budget_duration"
        )
    for name in ("team_member_rpm_limit", "team_member_tpm_limit"):
        value = getattr(req, name)
        if getattr(req, f"clear_{name}"):
            changes[name.replace("team_", "")] = None
        elif value is not None:
            changes[name.replace("team_", "")] = validation.limit(value, name)
    if req.model_max_budget is not None:
        changes["model_max_budget"] = _model_budgets(req.model_max_budget)
    if req.blocked is not None:
        changes["blocked"] = req.blocked
    return changes


def _lifetime_end(lifetime: Duration, now: float) -> float:
    """``now`` plus a key ``duration``: fixed seconds, or calendar months for ``Nmo``."""
    if lifetime.unit != "mo":
        return now + lifetime.seconds
    start = datetime.fromtimestamp(now, UTC)
    month = start.month - 1 + lifetime.count
    year, month = start.year + month // 12, month % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day).timestamp()


def _model_budgets(given: Mapping[str, ModelBudgetInput]) -> dict[str, ModelBudget]:
    """``model_max_budget`` checked: known durations, real budgets, bounded size."""
    if len(given) > validation.MAX_MODELS:
        raise InvalidArgument(f"model_max_budget has more than {validation.MAX_MODELS} entries")
    out: dict[str, ModelBudget] = {}
    for model, entry in given.items():
        name = validation.text(model, "model_max_budget model", required=True)
        limit = validation.budget(entry.budget_limit, f"model_max_budget[{name!r}].budget_limit")
        assert limit is not None
        duration = validation.duration_text(
            entry.time_period, f"model_max_budget[{name!r}].time_period"
        )
        out[name] = ModelBudget(limit, duration)
    return out


def _member_changed(member: MemberRecord, req: MemberChanges) -> MemberRecord:
    changes: dict[str, Any] = {}
    if req.clear_max_budget:
        changes["max_budget_nanos"] = None
    elif req.max_budget is not None:
        changes["max_budget_nanos"] = validation.budget(req.max_budget)
    if req.clear_budget_duration:
        changes["budget_duration"] = None
    elif req.budget_duration is not None:
        changes["budget_duration"] = validation.duration_text(req.budget_duration)
    for name in ("rpm_limit", "tpm_limit"):
        if getattr(req, f"clear_{name}"):
            changes[name] = None
        elif getattr(req, name) is not None:
            changes[name] = validation.limit(getattr(req, name), name)
    return replace(member, **changes)


def _reset_at(scope: ScopeBudget) -> float | None:
    return float(scope.window.end) if scope.window.end is not None else None


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument(f"page_size must not be negative, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
