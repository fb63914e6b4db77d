"""budgetd over the wire: the real gRPC server, reflection, health, auth and error codes."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ADMIN, BACKENDS, Running, backend_urls, make_settings, running_server
from server.config import Settings
from server.gen.budgetd.v1 import budgetd_pb2 as pb

SEED_MESSAGE = "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"


@pytest.fixture(params=BACKENDS)
def served_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, **urls)


@pytest.fixture
async def served(served_settings: tuple[str, Settings]) -> AsyncIterator[Running]:
    async with running_server(*served_settings) as running:
        yield running


async def seed_team_and_key(running: Running) -> tuple[pb.Team, pb.IssueKeyResponse]:
    team = await running.stub.CreateTeam(
        pb.CreateTeamRequest(team_alias="QA Prod Bot", max_budget=1e-9, budget_duration="1d"),
        metadata=ADMIN,
    )
    key = await running.stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
    return team, key


async def test_seed_walkthrough_over_grpc(served: Running) -> None:
    team, key = await seed_team_and_key(served)
    assert team.team_alias == "QA Prod Bot"
    assert team.max_budget == 1e-9 and team.budget_duration == "1d"
    assert team.HasField("budget_reset_at")
    assert key.key.startswith("sk-") and key.team_id == team.team_id

    first = await served.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key, model="llama3"))
    assert first.allowed
    spent = await served.stub.RecordSpend(
        pb.RecordSpendRequest(request_id="req-1", reservation_id=first.reservation_id, cost=3.5e-6)
    )
    assert spent.team_spend == 3.5e-6 and not spent.duplicate
    second = await served.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key, model="llama3"))
    assert not second.allowed
    assert second.reason == pb.BUDGET_EXCEEDED and second.scope == pb.SCOPE_TEAM
    assert second.message == SEED_MESSAGE

    again = await served.stub.RecordSpend(
        pb.RecordSpendRequest(request_id="req-1", reservation_id=first.reservation_id, cost=3.5e-6)
    )
    assert again.duplicate and again.team_spend == 3.5e-6


async def test_admin_rpcs_need_the_master_key(served: Running) -> None:
    request = pb.CreateTeamRequest(team_alias="t")
    for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "sk-1234"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.stub.CreateTeam(request, metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer <master key>" in (err.value.details() or "")
    listed = await served.stub.ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
    assert len(listed.teams) == 0


async def test_without_a_master_key_admin_is_refused_with_how_to_set_one(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, master_key=None)
    async with running_server("embedded", settings) as running:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "BUDGETD_MASTER_KEY" in (err.value.details() or "")


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.RecordSpendRequest(request_id="r", api_key="k", cost=-1), "INVALID_ARGUMENT", "cost"),
        (
            pb.RecordSpendRequest(request_id="r", api_key="k", cost=float("nan")),
            "INVALID_ARGUMENT",
            "cost",
        ),
        (
            pb.RecordSpendRequest(request_id="", api_key="k", cost=1),
            "INVALID_ARGUMENT",
            "request_id",
        ),
        (pb.CreateTeamRequest(team_alias="t", budget_duration="1x"), "INVALID_ARGUMENT", "1x"),
        (pb.CreateTeamRequest(team_alias="t", budget_duration="0d"), "INVALID_ARGUMENT", "0d"),
        (pb.CreateTeamRequest(team_alias="t", budget_duration="-1h"), "INVALID_ARGUMENT", "-1h"),
        (pb.CreateTeamRequest(team_alias="t" * 1000), "INVALID_ARGUMENT", "team_alias"),
        (pb.CreateTeamRequest(team_alias="t", max_budget=-5), "INVALID_ARGUMENT", "max_budget"),
        (pb.IssueKeyRequest(team_id="missing"), "NOT_FOUND", "missing"),
        (pb.IssueKeyRequest(team_id=""), "INVALID_ARGUMENT", "team_id"),
        (pb.GetTeamRequest(team_id="missing"), "NOT_FOUND", "missing"),
        (pb.RecordSpendRequest(request_id="r", reservation_id="forged", cost=1), "NOT_FOUND", ""),
    ],
)
async def test_bad_input_gets_the_right_code_and_a_message_and_writes_nothing(
    served: Running, request_: object, code: str, words: str
) -> None:
    method = {
        pb.RecordSpendRequest: served.stub.RecordSpend,
        pb.CreateTeamRequest: served.stub.CreateTeam,
        pb.IssueKeyRequest: served.stub.IssueKey,
        pb.GetTeamRequest: served.stub.GetTeam,
    }[type(request_)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await method(request_, metadata=ADMIN)  # type: ignore[operator]
    assert err.value.code().name == code
    assert words in (err.value.details() or "")
    listed = await served.stub.ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
    assert list(listed.teams) == []


async def test_spend_conflict_is_failed_precondition(served: Running) -> None:
    _, key = await seed_team_and_key(served)
    await served.stub.RecordSpend(pb.RecordSpendRequest(request_id="c", api_key=key.key, cost=1))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await served.stub.RecordSpend(
            pb.RecordSpendRequest(request_id="c", api_key=key.key, cost=2)
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_health_reports_serving(served: Running) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", "budgetd.v1.BudgetAuthority"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_one_second_budget_really_resets_at_the_next_second(tmp_path: Path) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="fast", max_budget=1e-9, budget_duration="1s"),
            metadata=ADMIN,
        )
        key = await running.stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
        first = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        await running.stub.RecordSpend(
            pb.RecordSpendRequest(request_id="x", reservation_id=first.reservation_id, cost=1e-6)
        )
        denied = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        if denied.allowed:  # the second ticked over between the calls: the spend reset
            return
        reset_at = denied.budget_reset_at.ToNanoseconds() / 1e9
        assert reset_at == int(reset_at)
        await asyncio.sleep(max(0.0, reset_at - time.time()) + 0.02)
        again = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        assert again.allowed and again.spend == 0


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return found


async def _grpcurl_json(target: str, *tail: str, flags: tuple[str, ...] = ()) -> dict[str, object]:
    """Run ``grpcurl -plaintext FLAGS TARGET TAIL…``; its JSON answer, or its text."""
    proc = await asyncio.create_subprocess_exec(
        _grpcurl(),
        "-plaintext",
        *flags,
        target,
        *tail,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return dict(json.loads(out)) if out.strip().startswith(b"{") else {"text": out.decode()}


async def test_seed_walkthrough_with_grpcurl_and_reflection(tmp_path: Path) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        t = running.target
        listed = await _grpcurl_json(t, "list")
        assert "budgetd.v1.BudgetAuthority" in str(listed["text"])
        assert "grpc.health.v1.Health" in str(listed["text"])
        described = await _grpcurl_json(t, "describe", "budgetd.v1.BudgetAuthority")
        assert "rpc CheckBudget" in str(described["text"])
        auth = ("-H", "authorization: Bearer sk-1234")
        team = await _grpcurl_json(
            t, "budgetd.v1.BudgetAuthority/CreateTeam",
            flags=(*auth, "-d",
                   '{"team_alias": "QA Prod Bot", "max_budget": 0.000000001,'
                   ' "budget_duration": "1d"}'),
        )  # fmt: skip
        assert team["team_alias"] == "QA Prod Bot" and team["max_budget"] == 1e-9
        key = await _grpcurl_json(
            t, "budgetd.v1.BudgetAuthority/IssueKey",
            flags=(*auth, "-d", json.dumps({"team_id": team["team_id"]})),
        )  # fmt: skip
        check = ("-d", json.dumps({"api_key": key["key"], "model": "llama3"}))
        first = await _grpcurl_json(t, "budgetd.v1.BudgetAuthority/CheckBudget", flags=check)
        assert first["allowed"] is True
        await _grpcurl_json(
            t, "budgetd.v1.BudgetAuthority/RecordSpend",
            flags=("-d", json.dumps({"request_id": "req-1",
                                     "reservation_id": first["reservation_id"],
                                     "cost": 0.0000035})),
        )  # fmt: skip
        second = await _grpcurl_json(t, "budgetd.v1.BudgetAuthority/CheckBudget", flags=check)
        assert second.get("allowed") in (None, False)
        assert second["reason"] == "BUDGET_EXCEEDED"
        assert second["message"] == SEED_MESSAGE
