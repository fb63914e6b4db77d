"""End to end through the real Envoy: examples/envoy/envoy-grpc.yaml in front of a fake
OpenAI-compatible upstream, with budgetd as ext_authz and ext_proc.

The seed's walkthrough: a team with ``max_budget`` 1e-9, a key, the same chat completion
twice: 200, then 400 with LiteLLM's body exactly; the first request's spend reaches budgetd
through ext_proc, from a JSON body, an SSE stream or the cost header, with Envoy's response
body mode STREAMED (as the example ships) and BUFFERED.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from envoy_harness import EnvoyProcess, free_ports, render_example
from envoy_messages import CHAT, PRICES, SEED_BODY, SEED_COST, eventually
from fake_openai import FakeOpenAI
from harness import ADMIN, Running, make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class Stack:
    """budgetd, the fake upstream and Envoy in front, with a team and its key."""

    running: Running
    upstream: FakeOpenAI
    envoy: EnvoyProcess
    http: aiohttp.ClientSession
    listen_port: int
    team_id: str = ""
    key: str = ""

    async def chat(self, body: dict[str, Any] | None = None, **headers: str) -> tuple[int, str]:
        """POST /chat/completions through Envoy, as the seed's curl does."""
        sent = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        async with self.http.post(
            f"http://127.0.0.1:{self.listen_port}/chat/completions",
            json=CHAT if body is None else body,
            headers={**sent, **headers},
        ) as response:
            return response.status, await response.text()

    async def team_spend(self) -> float:
        team = await self.running.stub.GetTeam(
            pb.GetTeamRequest(team_id=self.team_id), metadata=ADMIN
        )
        return float(team.spend)

    async def remaining(self) -> float:
        answer = await self.running.stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=self.key, estimated_cost=0.0)
        )
        return float(answer.remaining)


@asynccontextmanager
async def stack(tmp_path: Path, *, body_mode: str = "STREAMED", max_budget: float = 1e-9,
                **changes: Any) -> AsyncIterator[Stack]:  # fmt: skip
    """Everything up; on a failure the Envoy log's tail is attached to the error."""
    upstream = FakeOpenAI()
    await upstream.start()
    settings = make_settings(tmp_path, prices=PRICES, **changes)
    try:
        async with running_server("embedded", settings) as running:
            listen_port, admin_port = free_ports(2)
            config = render_example(
                "envoy-grpc.yaml",
                budgetd_port=running.server.port,
                upstream_port=upstream.port,
                listen_port=listen_port,
                admin_port=admin_port,
                response_body_mode=body_mode,
            )
            envoy = EnvoyProcess(config, admin_port)
            await envoy.start()
            timeout = aiohttp.ClientTimeout(total=15)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    team = await running.stub.CreateTeam(
                        pb.CreateTeamRequest(
                            team_alias="QA Prod Bot", max_budget=max_budget, budget_duration="1d"
                        ),
                        metadata=ADMIN,
                    )
                    key = await running.stub.IssueKey(
                        pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN
                    )
                    yield Stack(running, upstream, envoy, http, listen_port, team.team_id, key.key)
            except BaseException as exc:
                exc.add_note(f"--- envoy log ---\n{envoy.log_tail()}")
                raise
            finally:
                await envoy.stop()
    finally:
        await upstream.stop()


@pytest.mark.parametrize("body_mode", ["STREAMED", "BUFFERED"])
@pytest.mark.parametrize("source", ["json", "sse", "cost_header"])
async def test_seed_walkthrough_through_envoy(tmp_path: Path, body_mode: str, source: str) -> None:
    async with stack(tmp_path, body_mode=body_mode) as s:
        body: dict[str, Any] = dict(CHAT)
        if source == "sse":
            body["stream"] = True
        elif source == "cost_header":
            # The header is the cost, whatever the usage would price at (3e-07 here).
            s.upstream.behaviour.cost_header = "3.5e-06"
            s.upstream.behaviour.usage = {"prompt_tokens": 1, "completion_tokens": 1}

        status, text = await s.chat(body)
        assert status == 200, text
        if source == "sse":
            assert text.rstrip().endswith("data: [DONE]") and '"usage"' in text
        # ext_proc settles before Envoy releases the last of the response.
        assert await s.team_spend() == SEED_COST

        status, text = await s.chat(body)
        assert (status, text) == (400, SEED_BODY)
        assert len(s.upstream.requests) == 1  # the denied request never reached it

        seen = s.upstream.requests[0].headers
        assert "authorization" not in seen  # the budgetd key stays at the gateway
        assert seen["x-budget-team-id"] == s.team_id
        assert seen["x-budget-reservation-id"].startswith("r3.")
        assert seen["x-budget-model"] == "llama3"
        assert "x-budget-remaining-usd" in seen and "x-request-id" in seen


async def test_no_key_bad_body_and_oversized_body_through_envoy(tmp_path: Path) -> None:
    async with stack(tmp_path) as s:
        status, text = await s.chat(Authorization="")
        assert (status, text) == (
            401,
            '{"error": {"message": "No API key passed in the request.", "type": "auth_error",'
            ' "param": null, "code": 401}}',
        )
        async with s.http.post(
            f"http://127.0.0.1:{s.listen_port}/chat/completions",
            data=b'{"model": "llama3", "messages": [',
            headers={"Authorization": f"Bearer {s.key}", "Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        # Over the example's with_request_body limit (1 MiB): Envoy itself answers 413.
        huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 1)}]}
        status, _ = await s.chat(huge)
        assert status == 413
        assert s.upstream.requests == []


@pytest.mark.parametrize("policy", ["release", "estimate"])
async def test_client_leaving_mid_stream(tmp_path: Path, policy: str) -> None:
    async with stack(tmp_path, max_budget=1.0, incomplete_response=policy) as s:
        s.upstream.behaviour.mode = "stall"
        body = {**CHAT, "stream": True, "max_tokens": 10}  # holds 2.1e-06
        url = f"http://127.0.0.1:{s.listen_port}/chat/completions"
        headers = {"Authorization": f"Bearer {s.key}"}
        async with s.http.post(url, json=body, headers=headers) as response:
            assert response.status == 200
            first = await response.content.readuntil(b"\n\n")
            assert first.startswith(b"data: ")
            response.close()  # the client goes away mid-stream
        await asyncio.wait_for(s.upstream.client_gone.wait(), 10)
        if policy == "release":
            await eventually(s.remaining, 1.0)
            assert await s.team_spend() == 0.0
        else:
            await eventually(s.team_spend, 2.1e-6)
            assert await s.remaining() == 1.0 - 2.1e-6


async def test_upstream_failures_reach_the_client_unchanged_and_release(tmp_path: Path) -> None:
    async with stack(tmp_path, max_budget=1.0) as s:
        s.upstream.behaviour.mode = "fail"
        status, text = await s.chat({**CHAT, "max_tokens": 10})
        assert status == 500 and "the model is overloaded" in text
        await eventually(s.remaining, 1.0)

        s.upstream.behaviour.mode = "cut"
        with pytest.raises(aiohttp.ClientPayloadError):
            await s.chat({**CHAT, "stream": True, "max_tokens": 10})
        await eventually(s.remaining, 1.0)
        assert await s.team_spend() == 0.0


async def test_budgetd_down_gives_status_on_error_not_the_upstream(tmp_path: Path) -> None:
    async with stack(tmp_path, max_budget=1.0) as s:
        assert (await s.chat())[0] == 200
        await s.running.server.stop(grace=0.5)
        status, _ = await s.chat()
        assert status == 503  # the example's status_on_error
        assert len(s.upstream.requests) == 1


async def test_rate_limited_requests_get_429_with_retry_after_and_ratelimit_headers(
    tmp_path: Path,
) -> None:
    async with stack(tmp_path, max_budget=1.0) as s:
        limited = await s.running.stub.IssueKey(
            pb.IssueKeyRequest(team_id=s.team_id, rpm_limit=1), metadata=ADMIN
        )
        s.key = limited.key
        status, _ = await s.chat()
        assert status == 200
        async with s.http.post(
            f"http://127.0.0.1:{s.listen_port}/chat/completions",
            json=CHAT,
            headers={"Authorization": f"Bearer {s.key}"},
        ) as response:
            body = await response.json()
            assert response.status == 429
            assert 1 <= int(response.headers["retry-after"]) <= 60
            assert response.headers["x-ratelimit-limit"] == "1"
            assert response.headers["x-ratelimit-remaining"] == "0"
            assert 0 <= int(response.headers["x-ratelimit-reset"]) <= 60
        assert body["error"]["type"] == "rate_limit_error"
        assert "rpm_limit 1" in body["error"]["message"]
