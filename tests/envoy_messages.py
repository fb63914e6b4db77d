"""Shared pieces of the Envoy tests: prices, the seed's answer, budgetd with a team and a
key, and ext_authz / ext_proc messages shaped as Envoy 1.40 sends them (ext_proc header
values in ``raw_value``)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2 as attr_pb
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from harness import ADMIN, Running, make_settings, running_server
from server.config import ModelPrice
from server.gen.budgetd.v1 import budgetd_pb2 as pb

# llama3 at 1e-7 USD per prompt token and 2e-7 per completion token: USAGE below
# (15 prompt + 10 completion tokens) costs exactly the seed's 3.5e-06.
PRICES = MappingProxyType({"llama3": ModelPrice(Decimal("1e-7"), Decimal("2e-7"))})
USAGE = {"prompt_tokens": 15, "completion_tokens": 10, "total_tokens": 25}
SEED_COST = 3.5e-6
SEED_BODY = (
    '{"error": {"message": "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09",'
    ' "type": "auth_error", "param": null, "code": 400}}'
)
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


@dataclasses.dataclass
class Budgetd:
    """budgetd, stubs for the calls Envoy makes, and a team with one key."""

    running: Running
    authz: Any
    proc: Any
    team_id: str
    key: str

    async def team_spend(self) -> float:
        team = await self.running.stub.GetTeam(
            pb.GetTeamRequest(team_id=self.team_id), metadata=ADMIN
        )
        return float(team.spend)

    async def remaining(self) -> float:
        """Budget left after spend and every hold (a zero-cost check sees all holds)."""
        answer = await self.running.stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=self.key, estimated_cost=0.0)
        )
        return float(answer.remaining)

    async def check(self, headers: dict[str, str], body: bytes = b"", **http: Any) -> Any:
        return await self.authz.Check(check_request(headers, body, **http))

    async def allow(self, body: dict[str, Any] | None = None, request_id: str = "req-1") -> Any:
        """A Check that must be allowed; returns the upstream headers ext_authz set."""
        raw = json.dumps(CHAT if body is None else body).encode()
        answer = await self.check(
            {"authorization": f"Bearer {self.key}", "x-request-id": request_id}, raw
        )
        assert answer.status.code == 0, answer
        return upstream_headers(answer) | {"x-request-id": request_id}


@asynccontextmanager
async def serve(tmp_path: Path, *, max_budget: float = 1e-9, backend: str = "embedded",
                **changes: Any) -> AsyncIterator[Budgetd]:  # fmt: skip
    """budgetd with the test prices and a team (``max_budget``, 1d) with one key."""
    settings = make_settings(tmp_path, prices=PRICES, **changes)
    async with running_server(backend, settings) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(
                team_alias="QA Prod Bot", max_budget=max_budget, budget_duration="1d"
            ),
            metadata=ADMIN,
        )
        key = await running.stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
        yield Budgetd(
            running,
            auth_grpc.AuthorizationStub(running.channel),
            proc_grpc.ExternalProcessorStub(running.channel),
            team.team_id,
            key.key,
        )


# -- messages as Envoy sends them --------------------------------------------------------


def check_request(headers: dict[str, str], body: bytes = b"", *, as_text: bool = False) -> Any:
    """An ext_authz CheckRequest; the body as ``raw_body`` (pack_as_bytes) or ``body``."""
    http = attr_pb.AttributeContext.HttpRequest(
        id="1234", method="POST", path="/chat/completions", host="gateway", headers=headers
    )
    if as_text:
        http.body = body.decode()
    else:
        http.raw_body = body
    return auth_pb.CheckRequest(
        attributes=attr_pb.AttributeContext(request=attr_pb.AttributeContext.Request(http=http))
    )


def upstream_headers(answer: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in answer.ok_response.headers}


def denied_headers(answer: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in answer.denied_response.headers}


def headers_message(kind: str, headers: dict[str, str], end_of_stream: bool = False) -> Any:
    header_map = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )
    if kind.endswith("trailers"):
        return proc_pb.ProcessingRequest(**{kind: proc_pb.HttpTrailers(trailers=header_map)})
    part = proc_pb.HttpHeaders(headers=header_map, end_of_stream=end_of_stream)
    return proc_pb.ProcessingRequest(**{kind: part})


def body_message(kind: str, body: bytes, end_of_stream: bool) -> Any:
    return proc_pb.ProcessingRequest(
        **{kind: proc_pb.HttpBody(body=body, end_of_stream=end_of_stream)}
    )


def sse(*chunks: dict[str, Any], done: bool = True) -> list[bytes]:
    events = [f"data: {json.dumps(c)}\n\n".encode() for c in chunks]
    return events + ([b"data: [DONE]\n\n"] if done else [])


STREAM = sse(
    {"model": "llama3", "choices": [{"delta": {"content": "Hel"}}], "usage": None},
    {"model": "llama3", "choices": [{"delta": {"content": "lo"}}], "usage": None},
    {"model": "llama3", "choices": [], "usage": USAGE},
)


class Exchange:
    """One ext_proc stream, driven message by message as Envoy does."""

    def __init__(self, stub: Any) -> None:
        self.call = stub.Process()
        self.replies: list[str] = []

    async def send(self, message: Any) -> None:
        await self.call.write(message)
        reply = await asyncio.wait_for(self.call.read(), 5)
        kind = reply.WhichOneof("response")
        # Never a mutation: the empty answer of the same kind.
        assert kind == message.WhichOneof("request"), reply
        assert reply == proc_pb.ProcessingResponse(**{kind: getattr(reply, kind)})
        assert not getattr(reply, kind).ListFields(), reply
        self.replies.append(kind)

    async def close(self) -> None:
        await self.call.done_writing()
        assert await self.call.read() == grpc.aio.EOF
        assert await self.call.code() == grpc.StatusCode.OK

    async def run(self, request: dict[str, str], status: int, headers: dict[str, str],
                  chunks: list[bytes]) -> None:  # fmt: skip
        """A whole exchange: request headers, response headers, body chunks (STREAMED)."""
        await self.send(headers_message("request_headers", request))
        response = {":status": str(status), **headers}
        await self.send(headers_message("response_headers", response, not chunks))
        for index, chunk in enumerate(chunks):
            await self.send(body_message("response_body", chunk, index == len(chunks) - 1))
        await self.close()


JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream"}


async def eventually(probe: Any, expected: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (value := await probe()) != expected:
        assert time.monotonic() < deadline, f"{value!r} != {expected!r}"
        await asyncio.sleep(0.02)
