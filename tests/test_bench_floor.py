"""The floor's fixed answers have the shape of budgetd's real ones for the bench's key, so a
ratio against the floor prices budgetd's logic and not a bigger answer (bench/floor.py)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc

from envoy_messages import check_request
from harness import ADMIN, Running, make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import floor  # noqa: E402


@pytest.fixture
async def bench_key(tmp_path: Path) -> AsyncIterator[tuple[Running, str]]:
    """budgetd with a team and key made as the bench makes them (a huge budget, the alias)."""
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="bench", max_budget=1e6, budget_duration="30d"),
            metadata=ADMIN,
        )
        key = await running.stub.IssueKey(
            pb.IssueKeyRequest(team_id=team.team_id, key_alias=floor.KEY_ALIAS), metadata=ADMIN
        )
        # The bench's team has spend once its first RecordSpends are in (every answer then
        # carries it).
        await running.stub.RecordSpend(
            pb.RecordSpendRequest(request_id="first", api_key=key.key, cost=0.25)
        )
        yield running, key.key


def _shape(answer: Any) -> tuple[list[str], list[str], list[str], int]:
    """What an ext_authz allow carries: its header names (in order), the headers it removes,
    its metadata keys and its status; the values differ (ids, reservations)."""
    ok = answer.ok_response
    return (
        [each.header.key for each in ok.headers],
        list(ok.headers_to_remove),
        sorted(answer.dynamic_metadata.fields),
        answer.status.code,
    )


async def test_the_floors_envoy_allow_is_budgetds_for_the_bench_key(
    bench_key: tuple[Running, str],
) -> None:
    running, key = bench_key
    stub = auth_grpc.AuthorizationStub(running.channel)
    request = check_request({"authorization": f"Bearer {key}"})
    for _ in range(3):  # the first answers in full, later ones from the hot path
        answer = await stub.Check(request)
        assert _shape(answer) == _shape(floor.ENVOY_ANSWER)
        assert len(answer.SerializeToString()) >= len(floor.ENVOY_ANSWER.SerializeToString()) - 40


async def test_the_floors_check_answer_fills_what_budgetds_does(
    bench_key: tuple[Running, str],
) -> None:
    running, key = bench_key
    request = pb.CheckBudgetRequest(api_key=key, model="llama3", estimated_cost=1e-9)
    for _ in range(3):
        answer = await running.stub.CheckBudget(request)
        assert answer.allowed
        budgetd_fields = sorted(field.name for field, _ in answer.ListFields())
        floor_fields = sorted(field.name for field, _ in floor.CHECK_ANSWER.ListFields())
        assert budgetd_fields == floor_fields
