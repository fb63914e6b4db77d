"""End to end through the real Envoy in HTTP ext_authz mode: examples/envoy/envoy-http.yaml
in front of a fake OpenAI-compatible upstream, asking budgetd through the HTTP bridge before
each request, with budgetd's ext_proc (gRPC) settling the spend after it.

The seed's walkthrough with the team and key made through the bridge's LiteLLM admin API:
the same chat completion twice, 200 then 400 with LiteLLM's body exactly, the first
response's spend captured by ext_proc from JSON, from SSE and from the cost header. Also:
what reaches the upstream (no key, no forged ``x-budget-*``), and that nothing gets through
when budgetd or the bridge is down.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge_harness import MASTER, SEED_TEAM, running_bridge
from clients.bridge import Bridge
from envoy_harness import EXAMPLES, EnvoyProcess, free_ports, render_example
from envoy_messages import CHAT, PRICES, SEED_BODY, SEED_COST
from fake_openai import FakeOpenAI
from harness import Running, make_settings, running_server
from server.denials import ALLOW_HEADERS

pytestmark = pytest.mark.timeout(60)


@dataclasses.dataclass
class Stack:
    """budgetd, its bridge, the fake upstream and Envoy in front, with a team and its key."""

    running: Running
    bridge: Bridge
    upstream: FakeOpenAI
    envoy: EnvoyProcess
    http: aiohttp.ClientSession
    listen_port: int
    team_id: str = ""
    key: str = ""

    async def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST one of LiteLLM's admin endpoints on the bridge, as the seed's curl does."""
        async with self.http.post(self.bridge.url + path, json=body, headers=MASTER) as answer:
            assert answer.status == 200, await answer.text()
            result: dict[str, Any] = await answer.json()
            return result

    async def chat(
        self, body: dict[str, Any] | None = None, /, **headers: str
    ) -> tuple[int, str, dict[str, str]]:
        """POST /chat/completions through Envoy: (status, body, lowercased headers)."""
        sent = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        async with self.http.post(
            f"http://127.0.0.1:{self.listen_port}/chat/completions",
            json=CHAT if body is None else body,
            headers={**sent, **headers},
        ) as response:
            headers_seen = {name.lower(): value for name, value in response.headers.items()}
            return response.status, await response.text(), headers_seen

    async def team_spend(self) -> float:
        async with self.http.get(
            f"{self.bridge.url}/team/info", params={"team_id": self.team_id}, headers=MASTER
        ) as answer:
            assert answer.status == 200, await answer.text()
            return float((await answer.json())["team_info"]["spend"])


@asynccontextmanager
async def stack(tmp_path: Path, max_budget: float = 1e-9) -> AsyncIterator[Stack]:
    """Everything up; on a failure the Envoy log's tail is attached to the error."""
    upstream = FakeOpenAI()
    await upstream.start()
    settings = make_settings(tmp_path, prices=PRICES)
    try:
        async with (
            running_server("embedded", settings) as running,
            running_bridge(settings, running.target) as bridge,
        ):
            listen_port, admin_port = free_ports(2)
            config = render_example(
                "envoy-http.yaml",
                budgetd_port=running.server.port,
                bridge_port=bridge.port,
                upstream_port=upstream.port,
                listen_port=listen_port,
                admin_port=admin_port,
            )
            envoy = EnvoyProcess(config, admin_port)
            await envoy.start()
            timeout = aiohttp.ClientTimeout(total=15)
            try:
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    s = Stack(running, bridge, upstream, envoy, http, listen_port)
                    team = await s.admin("/team/new", {**SEED_TEAM, "max_budget": max_budget})
                    s.team_id = team["team_id"]
                    s.key = (await s.admin("/key/generate", {"team_id": s.team_id}))["key"]
                    yield s
            except BaseException as exc:
                exc.add_note(f"--- envoy log ---\n{envoy.log_tail()}")
                raise
            finally:
                await envoy.stop()
    finally:
        await upstream.stop()


def test_the_example_sends_upstream_exactly_the_headers_budgetd_sets() -> None:
    """The example's allowed_upstream_headers list is server/denials.py's, so neither can
    grow a header the other does not know about."""
    config = yaml.safe_load((EXAMPLES / "envoy-http.yaml").read_text())
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz = manager["typed_config"]["http_filters"][0]["typed_config"]
    patterns = authz["http_service"]["authorization_response"]["allowed_upstream_headers"]
    assert [p["exact"] for p in patterns["patterns"]] == list(ALLOW_HEADERS)
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}


@pytest.mark.parametrize("source", ["json", "sse", "cost_header"])
async def test_seed_walkthrough_through_envoy_http_ext_authz(tmp_path: Path, source: str) -> None:
    async with stack(tmp_path) as s:
        body: dict[str, Any] = dict(CHAT)
        if source == "sse":
            body["stream"] = True
        elif source == "cost_header":
            # The header is the cost, whatever the usage would price at (3e-07 here).
            s.upstream.behaviour.cost_header = "3.5e-06"
            s.upstream.behaviour.usage = {"prompt_tokens": 1, "completion_tokens": 1}

        status, text, _ = await s.chat(body)
        assert status == 200, text
        if source == "sse":
            assert text.rstrip().endswith("data: [DONE]") and '"usage"' in text
        # ext_proc settles before Envoy releases the last of the response.
        assert await s.team_spend() == SEED_COST

        status, text, headers = await s.chat(body)
        assert (status, text) == (400, SEED_BODY)
        assert headers["content-type"].startswith("application/json"), headers
        assert len(s.upstream.requests) == 1  # the denied request never reached it

        seen = s.upstream.requests[0].headers
        assert "authorization" not in seen  # the budgetd key stays at the gateway
        assert seen["x-budget-team-id"] == s.team_id
        assert seen["x-budget-reservation-id"].startswith("r3.")
        assert seen["x-budget-model"] == "llama3"
        assert "x-budget-remaining-usd" in seen and "x-request-id" in seen


async def test_what_reaches_the_upstream_and_what_is_refused(tmp_path: Path) -> None:
    async with stack(tmp_path, max_budget=1.0) as s:
        # The key in x-api-key; forged x-budget-* headers, one budgetd sets (overwritten)
        # and one it does not set for this key (removed).
        status, text, _ = await s.chat(
            Authorization="",
            **{"x-api-key": s.key, "x-budget-team-id": "forged", "x-budget-key-alias": "forged"},
        )
        assert status == 200, text
        seen = s.upstream.requests[-1].headers
        assert "x-api-key" not in seen
        assert seen["x-budget-team-id"] == s.team_id
        assert "x-budget-key-alias" not in seen

        status, text, _ = await s.chat(Authorization="")
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
        assert (await s.chat(huge))[0] == 413
        assert len(s.upstream.requests) == 1


async def test_budgetd_or_bridge_down_refuses_with_503_not_the_upstream(tmp_path: Path) -> None:
    async with stack(tmp_path, max_budget=1.0) as s:
        assert (await s.chat())[0] == 200
        # budgetd down: the bridge answers 503, and Envoy takes any 5xx from an HTTP auth
        # service as a failure, so the example's status_on_error (no body), as when...
        await s.running.server.stop(grace=0.5)
        assert (await s.chat())[:2] == (503, "")
        # ...the bridge is down too and Envoy cannot ask at all.
        await s.bridge.stop()
        assert (await s.chat())[:2] == (503, "")
        assert len(s.upstream.requests) == 1
