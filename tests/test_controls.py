"""Team and key controls on every backend: blocking, key lifetimes, model allow-lists, soft
budgets, per-model budgets, team members' budgets and rpm/tpm limits.

Each test runs on the embedded default, Postgres + Redis, Postgres + Redis Cluster and
Postgres alone (the counters of the Redis-down path), with the clock injected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from harness import CONTRACT_BACKENDS, Backend, backend_urls, make_settings, nanos, open_backend
from server.admin import MemberChanges, ModelBudgetInput, NewKey, NewTeam, TeamChanges
from server.authority import CheckRequest, Decision, Reason, SpendRequest
from server.config import Settings
from server.errors import AlreadyExists, InvalidArgument, NotFound
from server.rules import Enforcement
from server.storage.base import ScopeKind


@pytest.fixture(params=CONTRACT_BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    settings = make_settings(
        tmp_path, **urls, enforcement=Enforcement.CROSS_ONCE, reservation_ttl=60.0
    )
    return request.param, settings


@pytest.fixture
async def backend(backend_settings: tuple[str, Settings]) -> AsyncIterator[Backend]:
    async with open_backend(*backend_settings) as b:
        yield b


async def new_team(b: Backend, **fields: object) -> str:
    view = await b.admin.create_team(NewTeam(team_alias="team", **fields))  # type: ignore[arg-type]
    return view.team.team_id


async def new_key(b: Backend, team_id: str, **fields: object) -> str:
    issued = await b.admin.issue_key(NewKey(team_id=team_id, **fields))  # type: ignore[arg-type]
    return issued.plaintext


async def use(
    b: Backend, req: CheckRequest, cost: float, request_id: str, **spend: object
) -> Decision:
    """Check, and record ``cost`` when allowed; the decision."""
    decision = await b.authority.check(req)
    if decision.allowed:
        await b.authority.record(
            SpendRequest(
                request_id=request_id,
                reservation_id=decision.reservation_id,
                cost=cost,
                model=req.model,
                **spend,  # type: ignore[arg-type]
            )
        )
    return decision


# -- blocking ---------------------------------------------------------------------------


async def test_a_blocked_key_is_denied_until_unblocked(backend: Backend) -> None:
    team = await new_team(backend)
    key = await new_key(backend, team)
    view = await backend.admin.set_key_blocked(True, key=key)
    assert view.key.blocked
    denied = await backend.authority.check(CheckRequest(api_key=key))
    assert (denied.allowed, denied.reason, denied.scope) == (
        False,
        Reason.KEY_BLOCKED,
        ScopeKind.KEY,
    )
    assert "blocked" in denied.message
    await backend.admin.set_key_blocked(False, key_id=view.key.key_id)
    assert (await backend.authority.check(CheckRequest(api_key=key))).allowed


async def test_a_blocked_team_is_denied_until_unblocked(backend: Backend) -> None:
    team = await new_team(backend)
    key = await new_key(backend, team)
    assert (await backend.admin.set_team_blocked(team, True)).team.blocked
    denied = await backend.authority.check(CheckRequest(api_key=key))
    assert (denied.allowed, denied.reason, denied.scope) == (
        False,
        Reason.TEAM_BLOCKED,
        ScopeKind.TEAM,
    )
    await backend.admin.set_team_blocked(team, False)
    assert (await backend.authority.check(CheckRequest(api_key=key))).allowed


async def test_a_team_created_blocked_is_denied(backend: Backend) -> None:
    team = await new_team(backend, blocked=True)
    key = await new_key(backend, team)
    assert (await backend.authority.check(CheckRequest(api_key=key))).reason is Reason.TEAM_BLOCKED


# -- key lifetime -----------------------------------------------------------------------


async def test_key_duration_expires_the_key_relative_to_now(backend: Backend) -> None:
    team = await new_team(backend)
    issued = await backend.admin.issue_key(NewKey(team_id=team, duration="1h"))
    assert issued.view.key.expires_at == backend.clock.now() + 3600
    assert (await backend.authority.check(CheckRequest(api_key=issued.plaintext))).allowed
    backend.clock.advance(3600)
    expired = await backend.authority.check(CheckRequest(api_key=issued.plaintext))
    assert (expired.allowed, expired.reason) == (False, Reason.KEY_EXPIRED)


async def test_key_duration_in_months_is_calendar_months(backend: Backend) -> None:
    team = await new_team(backend)
    issued = await backend.admin.issue_key(NewKey(team_id=team, duration="1mo"))
    # The seed's instant is 2024-06-13T22:48:36Z: one month later is 2024-07-13T22:48:36Z.
    assert issued.view.key.expires_at == backend.clock.now() + 30 * 86400


async def test_bad_key_durations_are_invalid_and_issue_nothing(backend: Backend) -> None:
    team = await new_team(backend)
    with pytest.raises(InvalidArgument, match="duration"):
        await backend.admin.issue_key(NewKey(team_id=team, duration="soon"))
    with pytest.raises(InvalidArgument, match="not both"):
        await backend.admin.issue_key(
            NewKey(team_id=team, duration="1h", expires=backend.clock.now() + 10)
        )
    keys, _ = await backend.admin.list_keys(team, 10, "")
    assert keys == []


# -- model allow-lists ------------------------------------------------------------------


async def test_models_allow_lists_of_key_and_team(backend: Backend) -> None:
    team = await new_team(backend, models=["gpt-4o", "llama3"])
    key = await new_key(backend, team, models=["llama3"])
    assert (await backend.authority.check(CheckRequest(api_key=key, model="llama3"))).allowed
    by_key = await backend.authority.check(CheckRequest(api_key=key, model="gpt-4o"))
    assert (by_key.reason, by_key.scope) == (Reason.MODEL_NOT_ALLOWED, ScopeKind.KEY)
    other = await new_key(backend, team)
    by_team = await backend.authority.check(CheckRequest(api_key=other, model="claude"))
    assert (by_team.reason, by_team.scope) == (Reason.MODEL_NOT_ALLOWED, ScopeKind.TEAM)
    assert "claude" in by_team.message


# -- soft budgets -----------------------------------------------------------------------


async def test_soft_budget_allows_and_flags(backend: Backend) -> None:
    team = await new_team(backend, max_budget=1.0, soft_budget=0.5)
    key = await new_key(backend, team, soft_budget=0.25)
    first = await use(backend, CheckRequest(api_key=key), 0.3, "r1")
    assert first.allowed and not first.soft_budget_exceeded
    second = await use(backend, CheckRequest(api_key=key), 0.3, "r2")
    assert second.allowed and second.soft_budget_exceeded  # the key's 0.25 is passed
    other = await new_key(backend, team)
    third = await backend.authority.check(CheckRequest(api_key=other))
    assert third.allowed and third.soft_budget_exceeded  # the team's 0.5 is passed (0.6)
    team_view = await backend.admin.get_team(team)
    assert team_view.team.soft_budget_nanos == nanos(0.5)


# -- per-model budgets ------------------------------------------------------------------


async def test_model_max_budget_of_a_key_limits_only_that_model(backend: Backend) -> None:
    team = await new_team(backend)
    key = await new_key(backend, team, model_max_budget={"gpt-4o": ModelBudgetInput(1e-9, "1d")})
    first = await use(backend, CheckRequest(api_key=key, model="gpt-4o"), 3.5e-6, "m1")
    assert first.allowed
    denied = await backend.authority.check(CheckRequest(api_key=key, model="gpt-4o"))
    assert (denied.allowed, denied.reason, denied.scope) == (
        False,
        Reason.BUDGET_EXCEEDED,
        ScopeKind.KEY,
    )
    assert denied.model == "gpt-4o"
    assert denied.message == "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"
    assert (await backend.authority.check(CheckRequest(api_key=key, model="llama3"))).allowed
    backend.clock.advance(86400)  # the model budget's window resets with its time_period
    assert (await backend.authority.check(CheckRequest(api_key=key, model="gpt-4o"))).allowed


async def test_model_max_budget_of_a_team_counts_every_key(backend: Backend) -> None:
    team = await new_team(backend, model_max_budget={"gpt-4o": ModelBudgetInput(0.001, "")})
    a, b = await new_key(backend, team), await new_key(backend, team)
    assert (await use(backend, CheckRequest(api_key=a, model="gpt-4o"), 0.001, "t1")).allowed
    denied = await backend.authority.check(CheckRequest(api_key=b, model="gpt-4o"))
    assert (denied.reason, denied.scope, denied.model) == (
        Reason.BUDGET_EXCEEDED,
        ScopeKind.TEAM,
        "gpt-4o",
    )
    view = await backend.admin.get_team(team)
    assert view.team.model_max_budget["gpt-4o"].limit_nanos == nanos(0.001)


async def test_model_budgets_are_rebuilt_from_the_ledger(backend: Backend) -> None:
    team = await new_team(backend)
    key = await new_key(backend, team, model_max_budget={"gpt-4o": ModelBudgetInput(0.002, "")})
    for i in range(2):
        await use(backend, CheckRequest(api_key=key, model="gpt-4o"), 0.0009, f"g{i}")
    await use(backend, CheckRequest(api_key=key, model="llama3"), 0.5, "l0")
    await backend.lose_counters()
    # 0.0018 of gpt-4o in the ledger (the llama3 spend is not this budget's): still admits.
    assert (await use(backend, CheckRequest(api_key=key, model="gpt-4o"), 0.0009, "g2")).allowed
    denied = await backend.authority.check(CheckRequest(api_key=key, model="gpt-4o"))
    assert denied.reason is Reason.BUDGET_EXCEEDED and denied.model == "gpt-4o"


async def test_bad_model_budgets_are_invalid(backend: Backend) -> None:
    with pytest.raises(InvalidArgument, match="time_period"):
        await new_team(backend, model_max_budget={"m": ModelBudgetInput(1.0, "fortnight")})
    with pytest.raises(InvalidArgument, match="budget_limit"):
        await new_team(backend, model_max_budget={"m": ModelBudgetInput(-1.0, "")})


# -- team members: budgets --------------------------------------------------------------


async def test_team_member_budget_limits_each_member_separately(backend: Backend) -> None:
    team = await new_team(backend, team_member_budget=1e-9, team_member_budget_duration="1d")
    key = await new_key(backend, team)
    alice = CheckRequest(api_key=key, user_id="alice")
    assert (await use(backend, alice, 3.5e-6, "a1")).allowed
    denied = await backend.authority.check(alice)
    assert (denied.allowed, denied.reason, denied.scope, denied.user_id) == (
        False,
        Reason.BUDGET_EXCEEDED,
        ScopeKind.MEMBER,
        "alice",
    )
    assert denied.message == "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"
    assert (await backend.authority.check(CheckRequest(api_key=key, user_id="bob"))).allowed
    assert (await backend.authority.check(CheckRequest(api_key=key))).allowed  # no member
    backend.clock.advance(86400)
    assert (await backend.authority.check(alice)).allowed


async def test_a_members_own_budget_overrides_the_teams_default(backend: Backend) -> None:
    team = await new_team(backend, team_member_budget=1e-9)
    key = await new_key(backend, team)
    view = await backend.admin.add_member(MemberChanges(team, "carol", max_budget=1.0))
    assert view.terms.max_budget_nanos == nanos(1.0)
    carol = CheckRequest(api_key=key, user_id="carol")
    for i in range(3):
        assert (await use(backend, carol, 0.1, f"c{i}")).allowed
    members = await backend.admin.list_members(team)
    assert [(m.member.user_id, m.spend_nanos) for m in members] == [("carol", nanos(0.3))]
    await backend.admin.update_member(MemberChanges(team, "carol", clear_max_budget=True))
    assert (await backend.authority.check(carol)).reason is Reason.BUDGET_EXCEEDED


async def test_a_keys_user_is_the_member_whatever_the_request_says(backend: Backend) -> None:
    team = await new_team(backend, team_member_budget=1e-9)
    key = await new_key(backend, team, user_id="dave")
    assert (await use(backend, CheckRequest(api_key=key, user_id="eve"), 3.5e-6, "d1")).allowed
    denied = await backend.authority.check(CheckRequest(api_key=key, user_id="someone-else"))
    assert (denied.reason, denied.user_id) == (Reason.BUDGET_EXCEEDED, "dave")


async def test_member_spend_is_rebuilt_from_the_ledger(backend: Backend) -> None:
    team = await new_team(backend, team_member_budget=0.25)
    key = await new_key(backend, team)
    for i in range(2):
        await use(backend, CheckRequest(api_key=key, user_id="frank"), 0.1, f"f{i}")
    await use(backend, CheckRequest(api_key=key, user_id="grace"), 0.2, "g0")
    await backend.lose_counters()
    assert (await use(backend, CheckRequest(api_key=key, user_id="frank"), 0.1, "f2")).allowed
    denied = await backend.authority.check(CheckRequest(api_key=key, user_id="frank"))
    assert denied.reason is Reason.BUDGET_EXCEEDED and denied.spend_nanos == nanos(0.3)


async def test_member_admin_errors(backend: Backend) -> None:
    team = await new_team(backend)
    with pytest.raises(NotFound):
        await backend.admin.add_member(MemberChanges("no-such-team", "u"))
    await backend.admin.add_member(MemberChanges(team, "u"))
    with pytest.raises(AlreadyExists):
        await backend.admin.add_member(MemberChanges(team, "u"))
    with pytest.raises(NotFound):
        await backend.admin.update_member(MemberChanges(team, "nobody", rpm_limit=3))
    with pytest.raises(InvalidArgument, match="rpm_limit"):
        await backend.admin.update_member(MemberChanges(team, "u", rpm_limit=0))
    removed = await backend.admin.remove_member(team, "u")
    assert removed.member.user_id == "u"
    assert await backend.admin.list_members(team) == []


# -- rate limits ------------------------------------------------------------------------


async def test_team_member_rpm_limit_admits_exactly_the_limit(backend: Backend) -> None:
    team = await new_team(backend, team_member_rpm_limit=3)
    key = await new_key(backend, team)
    alice = CheckRequest(api_key=key, user_id="alice")
    answers = [await backend.authority.check(alice) for _ in range(5)]
    assert [a.allowed for a in answers] == [True, True, True, False, False]
    limited = answers[3]
    assert (limited.reason, limited.scope, limited.user_id) == (
        Reason.RATE_LIMITED,
        ScopeKind.MEMBER,
        "alice",
    )
    assert limited.retry_after == pytest.approx(20.0, abs=0.01)
    assert limited.rate is not None and limited.rate.per_minute == 3
    assert limited.rate.remaining == 0
    assert "rpm_limit 3" in limited.message
    # Another member has their own limit; a rate denial held nothing on the budgets.
    assert (await backend.authority.check(CheckRequest(api_key=key, user_id="bob"))).allowed
    backend.clock.advance(20)
    assert (await backend.authority.check(alice)).allowed
    assert not (await backend.authority.check(alice)).allowed


async def test_key_and_team_rpm_limits(backend: Backend) -> None:
    team = await new_team(backend, rpm_limit=4)
    key = await new_key(backend, team, rpm_limit=2)
    other = await new_key(backend, team)
    key_answers = [await backend.authority.check(CheckRequest(api_key=key)) for _ in range(3)]
    assert [a.allowed for a in key_answers] == [True, True, False]
    assert key_answers[2].scope is ScopeKind.KEY
    other_answers = [await backend.authority.check(CheckRequest(api_key=other)) for _ in range(3)]
    assert [a.allowed for a in other_answers] == [True, True, False]  # the team's 4 are used
    assert other_answers[2].scope is ScopeKind.TEAM


async def test_tpm_limit_charges_the_estimate_and_settles_the_actual(backend: Backend) -> None:
    team = await new_team(backend)
    key = await new_key(backend, team, tpm_limit=100)
    first = await backend.authority.check(CheckRequest(api_key=key, max_tokens=60))
    assert first.allowed and first.rate is not None and first.rate.remaining == 40
    second = await backend.authority.check(CheckRequest(api_key=key, max_tokens=60))
    assert second.allowed  # 60 < 100: the request that crosses the limit completes
    third = await backend.authority.check(CheckRequest(api_key=key, max_tokens=1))
    assert (third.allowed, third.reason) == (False, Reason.RATE_LIMITED)
    # The first used 10 tokens, not 60: settling gives 50 back (120 -> 70).
    await backend.authority.record(
        SpendRequest(
            request_id="t1",
            reservation_id=first.reservation_id,
            cost=1e-6,
            prompt_tokens=4,
            completion_tokens=6,
        )
    )
    # A retry of the same RecordSpend does not give them back twice.
    await backend.authority.record(
        SpendRequest(
            request_id="t1",
            reservation_id=first.reservation_id,
            cost=1e-6,
            prompt_tokens=4,
            completion_tokens=6,
        )
    )
    fourth = await backend.authority.check(CheckRequest(api_key=key, max_tokens=10))
    assert fourth.allowed and fourth.rate is not None and fourth.rate.remaining == 20


async def test_a_budget_denial_charges_no_rate_limit(backend: Backend) -> None:
    team = await new_team(backend, max_budget=1e-9)
    key = await new_key(backend, team, rpm_limit=2)
    assert (await use(backend, CheckRequest(api_key=key), 3.5e-6, "b1")).allowed
    for _ in range(3):
        denied = await backend.authority.check(CheckRequest(api_key=key))
        assert denied.reason is Reason.BUDGET_EXCEEDED
    await backend.admin.update_team(TeamChanges(team_id=team, clear_max_budget=True))
    # Only the first request counted against the rpm limit: one more fits.
    assert (await backend.authority.check(CheckRequest(api_key=key))).allowed
    assert (await backend.authority.check(CheckRequest(api_key=key))).reason is Reason.RATE_LIMITED
