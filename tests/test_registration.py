"""server.registration: only the decision path's methods are registered with grpc, every
method is still served, and the bench's floor registers exactly what budgetd registers."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from harness import ADMIN, make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc
from server.registration import REGISTERED, add_service

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import floor  # noqa: E402


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The full names of the methods every grpc.aio server registers in advance meanwhile."""
    names: set[str] = set()
    server_class = importlib.import_module("grpc.aio._server").Server  # (no type stubs)
    original = server_class.add_registered_method_handlers

    def record(self: Any, service: str, handlers: dict[str, Any]) -> None:
        names.update(f"/{service}/{name}" for name in handlers)
        original(self, service, handlers)

    monkeypatch.setattr(server_class, "add_registered_method_handlers", record)
    yield names


class Answers(pb_grpc.BudgetAuthorityServicer):
    async def CheckBudget(  # type: ignore[override]
        self, request: pb.CheckBudgetRequest, context: Any
    ) -> bytes:
        return pb.CheckBudgetResponse(allowed=True, team_id=request.api_key).SerializeToString()

    async def RecordSpend(
        self, request: pb.RecordSpendRequest, context: Any
    ) -> pb.RecordSpendResponse:
        return pb.RecordSpendResponse(cost=1.5)

    async def GetTeam(self, request: pb.GetTeamRequest, context: Any) -> pb.Team:
        return pb.Team(team_id=request.team_id)


async def test_add_service_registers_only_the_decision_path_and_serves_every_method(
    registered: set[str],
) -> None:
    server = grpc.aio.server()
    answers = Answers()  # type: ignore[abstract]  # the other RPCs: UNIMPLEMENTED
    add_service(
        pb_grpc.add_BudgetAuthorityServicer_to_server, answers, server,
        bytes_methods=("CheckBudget",),
    )  # fmt: skip
    assert registered == {
        "/budgetd.v1.BudgetAuthority/CheckBudget",
        "/budgetd.v1.BudgetAuthority/RecordSpend",
    }
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BudgetAuthorityStub(channel)
            # A handler's bytes go out as they are; the other methods keep their serialisers.
            answer = await stub.CheckBudget(pb.CheckBudgetRequest(api_key="k"))
            assert answer.allowed and answer.team_id == "k"
            assert (await stub.RecordSpend(pb.RecordSpendRequest())).cost == 1.5
            # Not registered in advance: served by the generic handler all the same.
            assert (await stub.GetTeam(pb.GetTeamRequest(team_id="t"))).team_id == "t"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListTeams(pb.ListTeamsRequest())
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)


async def test_bytes_only_for_unary_methods() -> None:
    server = grpc.aio.server()
    with pytest.raises(ValueError, match="Process is not unary"):
        add_service(
            proc_grpc.add_ExternalProcessorServicer_to_server,
            proc_grpc.ExternalProcessorServicer(),
            server,
            bytes_methods=("Process",),
        )


async def test_budgetd_registers_the_decision_path_alone_and_serves_the_rest(
    registered: set[str], tmp_path: Path
) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as budgetd:
        assert registered == REGISTERED
        # Admin, health and reflection: served, though grpc was not told of them ahead.
        team = await budgetd.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="a", max_budget=1.0), metadata=ADMIN
        )
        key = await budgetd.stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
        answer = await budgetd.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        assert answer.allowed and answer.team_id == team.team_id
        health = health_pb2_grpc.HealthStub(budgetd.channel)
        status = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflector = reflection_pb2_grpc.ServerReflectionStub(budgetd.channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in reflector.ServerReflectionInfo(iter([request])):
            listed = {service.name for service in reply.list_services_response.service}
            assert "budgetd.v1.BudgetAuthority" in listed
            break


def test_the_floor_registers_what_budgetd_registers(registered: set[str]) -> None:
    async def build() -> None:
        server = grpc.aio.server()
        floor.add_services(server)

    asyncio.run(build())
    assert registered == REGISTERED
