"""The HTTP bridge against an in-process budgetd: the seed's curl walkthrough, the gateway
auth endpoints, /spend, and every error a caller can meet."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import grpc
import pytest

from bridge_harness import CHAT, MASTER, SEED_DENIAL, SEED_TEAM, running_bridge
from clients.bridge import Bridge
from clients.grpc_client import BudgetdClient, RpcError, pb
from harness import BACKENDS, backend_urls, make_settings, running_server
from server.config import ModelPrice, Settings
from server.errors import http_status_for_code
from services import free_port

# llama3 at 1e-7 USD per prompt token and 2e-7 per completion token: 15 + 10 tokens cost
# exactly the seed's 3.5e-06.
PRICES = MappingProxyType({"llama3": ModelPrice(Decimal("1e-7"), Decimal("2e-7"))})


@dataclasses.dataclass
class Bridged:
    """budgetd + bridge, and an HTTP session to the bridge."""

    bridge: Bridge
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.bridge.url

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body or {}, headers) of one request to the bridge."""
        async with self.http.request(method, self.url + path, headers=headers, **kw) as answer:
            text = await answer.text()
            body = json.loads(text) if text else {}
            return answer.status, body, dict(answer.headers)

    async def seed_team_and_key(self) -> tuple[dict[str, Any], dict[str, Any]]:
        status, team, _ = await self.call("POST", "/team/new", headers=MASTER, json=SEED_TEAM)
        assert status == 200, team
        status, key, _ = await self.call(
            "POST", "/key/generate", headers=MASTER, json={"team_id": team["team_id"]}
        )
        assert status == 200, key
        return team, key


@pytest.fixture(params=BACKENDS)
def bridge_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, prices=PRICES, **urls)


@pytest.fixture
async def bridged(bridge_settings: tuple[str, Settings]) -> AsyncIterator[Bridged]:
    name, settings = bridge_settings
    async with (
        running_server(name, settings) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        yield Bridged(bridge, http)


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Bridged]:
    """The embedded backend only, with a small body limit (errors need no second backend)."""
    settings = make_settings(tmp_path, prices=PRICES, max_body_bytes=4096)
    async with (
        running_server("embedded", settings) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        yield Bridged(bridge, http)


def bearer(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


async def test_seed_walkthrough_through_the_bridge(bridged: Bridged) -> None:
    team, key = await bridged.seed_team_and_key()
    assert {k: team[k] for k in ("team_alias", "max_budget", "budget_duration")} == {
        "team_alias": "QA Prod Bot", "max_budget": 1e-09, "budget_duration": "1d",
    }  # fmt: skip
    assert team["team_id"] and team["budget_reset_at"].endswith("T00:00:00.000000Z")
    assert key["team_id"] == team["team_id"] and key["key"].startswith("sk-")

    # The request twice: allowed, its cost reported, then the seed's denial exactly.
    status, _, headers = await bridged.call("POST", "/traefik/auth", headers=bearer(key), json=CHAT)
    assert status == 200 and headers["x-budget-team-id"] == team["team_id"]
    spend = {"request_id": "req-1", "reservation_id": headers["x-budget-reservation-id"]}
    status, spent, _ = await bridged.call("POST", "/spend", json={**spend, "cost": 0.0000035})
    assert status == 200 and spent["team_spend"] == 3.5e-06 and spent["duplicate"] is False
    async with bridged.http.post(
        bridged.url + "/traefik/auth", headers=bearer(key), json=CHAT
    ) as denied:
        assert denied.status == 400
        assert await denied.text() == SEED_DENIAL

    status, info, _ = await bridged.call(
        "GET", f"/team/info?team_id={team['team_id']}", headers=MASTER
    )
    assert status == 200 and info["team_id"] == team["team_id"]
    assert (
        info["team_info"]["spend"] == 3.5e-06 and info["team_info"]["team_alias"] == "QA Prod Bot"
    )
    status, info, _ = await bridged.call("GET", f"/key/info?key={key['key']}", headers=MASTER)
    assert status == 200 and info["key"] == key["key"]
    assert info["info"]["key_id"] == key["key_id"] and info["info"]["spend"] == 3.5e-06
    assert key["key"] not in json.dumps(info["info"])  # the plaintext is never stored

    # Raise the budget: the next request passes again.
    update = {"team_id": team["team_id"], "max_budget": 1.0, "budget_duration": "30d"}
    status, updated, _ = await bridged.call("POST", "/team/update", headers=MASTER, json=update)
    assert status == 200 and updated["team_id"] == team["team_id"]
    assert updated["data"]["max_budget"] == 1.0 and updated["data"]["budget_duration"] == "30d"
    status, _, _ = await bridged.call("POST", "/traefik/auth", headers=bearer(key), json=CHAT)
    assert status == 200

    status, deleted, _ = await bridged.call(
        "POST", "/key/delete", headers=MASTER, json={"keys": [key["key"]]}
    )
    assert status == 200 and deleted == {"deleted_keys": [key["key"]]}
    status, body, _ = await bridged.call("POST", "/traefik/auth", headers=bearer(key), json=CHAT)
    assert status == 401 and body["error"]["type"] == "auth_error"


async def test_spend_is_idempotent_on_request_id(bridged: Bridged) -> None:
    _, key = await bridged.seed_team_and_key()
    report = {"request_id": "once", "model": "llama3",
              "usage": {"prompt_tokens": 15, "completion_tokens": 10}}  # fmt: skip
    status, first, _ = await bridged.call("POST", "/spend", headers=bearer(key), json=report)
    assert status == 200, first
    assert first["cost"] == 3.5e-06 and first["duplicate"] is False
    status, again, _ = await bridged.call("POST", "/spend", headers=bearer(key), json=report)
    assert status == 200 and again["duplicate"] is True and again["team_spend"] == 3.5e-06
    conflict = {"request_id": "once", "cost": 1.0}
    status, body, _ = await bridged.call("POST", "/spend", headers=bearer(key), json=conflict)
    assert status == 409 and body["error"]["code"] == 409


async def test_the_seed_curl_commands_unchanged_but_host(embedded: Bridged) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    async def run(*args: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            curl, "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, err.decode()
        return dict(json.loads(out))

    base = embedded.url
    team = await run(
        "-X", "POST", f"{base}/team/new",
        "-H", "Authorization: Bearer sk-1234", "-H", "Content-Type: application/json",
        "-d", '{"team_alias": "QA Prod Bot", "max_budget": 0.000000001, "budget_duration": "1d"}',
    )  # fmt: skip
    assert team["team_alias"] == "QA Prod Bot" and team["max_budget"] == 1e-09
    assert team["budget_duration"] == "1d" and "budget_reset_at" in team
    key = await run(
        "-X", "POST", f"{base}/key/generate",
        "-H", "Authorization: Bearer sk-1234", "-H", "Content-Type: application/json",
        "-d", json.dumps({"team_id": team["team_id"]}),
    )  # fmt: skip
    assert key["team_id"] == team["team_id"] and key["key"].startswith("sk-")


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "words"),
    [
        ("POST", "/team/new", {}, SEED_TEAM, 401, "Bearer <master key>"),
        ("POST", "/team/new", {"Authorization": "Bearer nope"}, SEED_TEAM, 401, "master key"),
        ("GET", "/team/info?team_id=missing", MASTER, None, 404, "missing"),
        ("GET", "/team/info", MASTER, None, 400, "team_id is required"),
        ("GET", "/key/info?key=sk-unknown", MASTER, None, 404, ""),
        ("POST", "/key/generate", MASTER, {"team_id": "missing"}, 404, "missing"),
        ("POST", "/team/new", MASTER, b'{"team_alias": "x",', 400, "malformed JSON"),
        ("POST", "/team/new", MASTER, b"[1, 2]", 400, "JSON object"),
        ("POST", "/team/new", MASTER, b"", 400, "empty"),
        ("POST", "/team/new", MASTER, {"max_budget": "lots"}, 400, "max_budget"),
        ("POST", "/team/new", MASTER, {"budget_duration": "1x"}, 400, "1x"),
        ("POST", "/team/new", MASTER, {"models": "llama3"}, 400, "models"),
        ("POST", "/team/new", MASTER, b'{"team_alias": "' + b"x" * 5000 + b'"}', 413, "4096"),
        ("POST", "/team/update", MASTER, {"max_budget": 1}, 400, "team_id"),
        ("POST", "/key/delete", MASTER, {"keys": []}, 400, "keys"),
        ("POST", "/key/delete", MASTER, {"keys": ["sk-unknown"]}, 404, ""),
        ("POST", "/key/generate", MASTER, {"team_id": "t", "duration": "soon"}, 400, "duration"),
        ("POST", "/spend", {}, {"cost": 1}, 400, "request_id"),
        ("POST", "/spend", {}, {"request_id": "r", "cost": 1}, 401, "No API key"),
        ("POST", "/spend", {}, {"request_id": "r", "model": "llama3"}, 400, "usage"),
        ("POST", "/spend", {"x-api-key": "k"}, {"request_id": "r", "cost": -1}, 400, "cost"),
        ("POST", "/spend", {}, {"request_id": "r", "cost": True}, 400, "cost"),
        (
            "POST", "/spend", {"x-api-key": "k"},
            {"request_id": "r", "model": "llama3", "usage": {"prompt_tokens": -5}},
            400, "usage.prompt_tokens",
        ),
        ("GET", "/no/such/path", {}, None, 404, "no such endpoint"),
        ("GET", "/team/new", MASTER, None, 405, "GET"),
    ],
)  # fmt: skip
async def test_errors_are_litellm_json_with_the_right_status(
    embedded: Bridged,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    words: str,
) -> None:
    kw: dict[str, Any] = {}
    if isinstance(body, bytes):
        kw["data"] = body
    elif body is not None:
        kw["json"] = body
    got, answer, _ = await embedded.call(method, path, headers=headers, **kw)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    assert words in error["message"]


async def test_budgetd_down_is_a_503_json_and_the_bridge_recovers(tmp_path: Path) -> None:
    port = free_port()
    settings = make_settings(tmp_path, grpc_addr=f"127.0.0.1:{port}")
    async with (
        running_bridge(settings, f"127.0.0.1:{port}") as bridge,
        aiohttp.ClientSession() as http,
    ):
        down = Bridged(bridge, http)
        status, body, _ = await down.call("POST", "/team/new", headers=MASTER, json=SEED_TEAM)
        assert status == 503 and "budgetd is unavailable" in body["error"]["message"]
        status, body, _ = await down.call("POST", "/traefik/auth", headers=MASTER, json=CHAT)
        assert status == 503 and body["error"]["code"] == 503
        status, _, headers = await down.call("GET", "/nginx/auth", headers=MASTER)
        assert status == 503 and headers["x-budget-status"] == "503"
        assert (await down.call("GET", "/health/readiness"))[0] == 503
        assert (await down.call("GET", "/healthz"))[0] == 200

        async with running_server("embedded", settings):
            for _ in range(100):  # the channel's reconnect backoff is at most 2 s
                status, _, _ = await down.call("GET", "/health/readiness")
                if status == 200:
                    break
                await asyncio.sleep(0.1)
            assert status == 200
            status, team, _ = await down.call("POST", "/team/new", headers=MASTER, json=SEED_TEAM)
            assert status == 200 and team["max_budget"] == 1e-09


async def test_envoy_http_authz_allows_with_headers_and_removes_the_key(embedded: Bridged) -> None:
    _, key = await embedded.seed_team_and_key()
    status, _, headers = await embedded.call(
        "POST", "/envoy/authz/v1/chat/completions",
        headers={"x-api-key": key["key"], "content-type": "application/json"},
        data=json.dumps({**CHAT, "max_tokens": 10}),
    )  # fmt: skip
    assert status == 200
    assert headers["x-budget-model"] == "llama3" and "x-budget-remaining-usd" in headers
    # 10 completion tokens at 2e-7 plus the prompt estimate are held for the request.
    assert float(headers["x-budget-reserved-usd"]) > 2e-6
    removed = headers["x-envoy-auth-headers-to-remove"].split(",")
    assert "x-api-key" in removed and "x-budget-key-alias" in removed


@pytest.mark.parametrize(
    ("extra_headers", "body", "status", "words"),
    [
        ({"content-type": "application/json"}, b'{"model": "llama3", "messages": [', 400, "JSON"),
        ({"content-type": "application/json"}, b'{"model": "llama3", "max_tokens": -1}', 400,
         "max_tokens"),
        ({"content-type": "application/json"}, b'{"model": "' + b"x" * 5000 + b'"}', 413, "4096"),
        # A body Envoy cut at max_request_bytes cannot parse: decided on the key alone.
        ({"x-envoy-auth-partial-body": "true"}, b'{"model": "llama3", "messages": [', 200, ""),
        ({"content-type": "multipart/form-data; boundary=x"}, b"--x--", 200, ""),
    ],
)  # fmt: skip
async def test_envoy_http_authz_body_problems(
    embedded: Bridged, extra_headers: dict[str, str], body: bytes, status: int, words: str
) -> None:
    _, key = await embedded.seed_team_and_key()
    got, answer, _ = await embedded.call(
        "POST", "/envoy/authz/chat/completions", headers={**bearer(key), **extra_headers}, data=body
    )
    assert got == status, answer
    if status != 200:
        assert words in answer["error"]["message"]


async def test_nginx_auth_denials_are_401_or_403_with_the_real_status(embedded: Bridged) -> None:
    status, body, headers = await embedded.call("GET", "/nginx/auth")
    assert status == 401 and headers["x-budget-status"] == "401"
    assert json.loads(headers["x-budget-error"]) == body
    _, key = await embedded.seed_team_and_key()
    status, _, headers = await embedded.call("GET", "/nginx/auth", headers=bearer(key))
    assert status == 200 and "x-budget-reservation-id" in headers
    await embedded.call(
        "POST", "/spend", headers=bearer(key), json={"request_id": "r", "cost": 3.5e-6}
    )
    status, _, headers = await embedded.call("GET", "/nginx/auth", headers=bearer(key))
    assert status == 403 and headers["x-budget-status"] == "400"
    assert headers["x-budget-message"] == json.loads(SEED_DENIAL)["error"]["message"]
    assert headers["x-budget-error"] == SEED_DENIAL


async def test_the_python_client_reports_grpc_codes(embedded: Bridged) -> None:
    async with BudgetdClient(embedded.bridge.config.target) as client:
        with pytest.raises(RpcError) as err:
            await client.get_team(
                pb.GetTeamRequest(team_id="nope"), authorization=MASTER["Authorization"]
            )
        assert err.value.code == grpc.StatusCode.NOT_FOUND and not err.value.unreachable
        assert await client.serving()


def test_grpc_codes_map_through_the_one_error_table() -> None:
    assert http_status_for_code(grpc.StatusCode.NOT_FOUND) == 404
    assert http_status_for_code(grpc.StatusCode.FAILED_PRECONDITION) == 409
    assert http_status_for_code(grpc.StatusCode.UNAUTHENTICATED) == 401
    assert http_status_for_code(grpc.StatusCode.DEADLINE_EXCEEDED) == 503
    assert http_status_for_code(grpc.StatusCode.INTERNAL) == 500
