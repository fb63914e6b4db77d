"""Real nginx (Debian's package) with auth_request -> the bridge, from examples/nginx.

nginx runs in the foreground from the example config, rendered onto free ports, in front of
a recording upstream: an allow carries the x-budget-* headers upstream; the seed's second
request is denied as auth_request's 403 and remapped by error_page to the seed's 400 JSON.
"""

from __future__ import annotations

import json
import os
import shutil
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
from clients.bridge import Bridge, BridgeConfig
from clients.grpc_client import BudgetdClient, pb
from harness import Running, make_settings, running_server
from services import free_port

EXAMPLE = EXAMPLES / "nginx" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's package)")
    return found


@dataclass
class Gateway:
    """nginx, the bridge and budgetd behind it, and the upstream in front of which it sits."""

    url: str
    remapped: bool
    bridge: Bridge
    running: Running
    upstream: Upstream
    http: aiohttp.ClientSession


async def start_nginx(
    tmp_path: Path, bridge_port: int, upstream_port: int, *, remap: bool = True
) -> tuple[list[str], Path, int]:
    """Render the example (optionally without the 403 remap); argv, log path and port."""
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = render(
        EXAMPLE,
        {
            "127.0.0.1:8080": f"127.0.0.1:{port}",
            "127.0.0.1:4000": f"127.0.0.1:{bridge_port}",
            "127.0.0.1:8000": f"127.0.0.1:{upstream_port}",
        },
        prefix / "nginx.conf",
    )
    if not remap:
        text = conf.read_text()
        conf.write_text(text.replace("error_page 403 = @budget_denied;", ""))
    main = f"daemon off; pid {prefix / 'nginx.pid'}; error_log stderr notice;"
    if os.geteuid() == 0:
        # As root nginx's workers become `nobody`, who cannot use the test's private
        # directory: keep them root (CI runs as root; a normal user needs nothing).
        main += " user root;"
    argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g", main]
    return argv, prefix / "nginx.log", port


@pytest.fixture(params=["remapped", "raw"])
async def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Gateway]:
    settings = make_settings(tmp_path)
    async with (
        running_server("embedded", settings) as running,
        running_bridge(settings, running.target) as bridge,
        running_upstream() as upstream,
        aiohttp.ClientSession() as http,
    ):
        argv, log, port = await start_nginx(
            tmp_path, bridge.port, upstream.port, remap=request.param == "remapped"
        )
        async with child_process(argv, cwd=tmp_path, log=log) as proc:
            url = f"http://127.0.0.1:{port}"
            # Without a key the bridge answers 401: nginx, bridge and budgetd are all up.
            await wait_until_answers(http, url + "/v1/models", proc, log, ready=(401,))
            remapped = request.param == "remapped"
            yield Gateway(url, remapped, bridge, running, upstream, http)


async def seed_key(gateway: Gateway) -> str:
    async with gateway.http.post(
        gateway.bridge.url + "/team/new", headers=MASTER, json=SEED_TEAM
    ) as answer:
        team = await answer.json()
    async with gateway.http.post(
        gateway.bridge.url + "/key/generate", headers=MASTER, json={"team_id": team["team_id"]}
    ) as answer:
        return str((await answer.json())["key"])


async def test_allow_then_the_seed_denial(gateway: Gateway) -> None:
    key = await seed_key(gateway)
    auth = {"Authorization": f"Bearer {key}"}
    async with gateway.http.post(gateway.url + "/chat/completions", headers=auth, json=CHAT) as ok:
        assert ok.status == 200
        await ok.read()
    seen = gateway.upstream.seen[-1]
    assert seen["x-budget-team-id"] and seen["x-budget-reservation-id"].startswith("r3.")
    assert seen["x-budget-remaining-usd"] == "1e-09"
    assert "authorization" not in seen  # the budgetd key stays at the gateway

    # The gateway reports what the request cost, then the same request is refused.
    spend = {"request_id": "req-1", "reservation_id": seen["x-budget-reservation-id"],
             "cost": 0.0000035}  # fmt: skip
    async with gateway.http.post(gateway.bridge.url + "/spend", json=spend) as spent:
        assert spent.status == 200
    calls = len(gateway.upstream.seen)
    async with gateway.http.post(
        gateway.url + "/chat/completions", headers=auth, json=CHAT
    ) as denied:
        body = await denied.text()
    assert len(gateway.upstream.seen) == calls  # it never reached the upstream
    if gateway.remapped:  # the example's error_page 403 = @budget_denied
        assert denied.status == 400 and body == SEED_DENIAL
        assert denied.content_type == "application/json"
    else:  # auth_request's own refusal: nginx can only say 403
        assert denied.status == 403


async def test_no_key_is_a_401_with_litellm_json(gateway: Gateway) -> None:
    async with gateway.http.post(gateway.url + "/chat/completions", json=CHAT) as answer:
        assert answer.status == 401
        body = json.loads(await answer.text())
    assert body["error"]["type"] == "auth_error" and body["error"]["code"] == 401
    assert gateway.upstream.seen == []


async def test_a_forged_budget_header_never_reaches_the_upstream(gateway: Gateway) -> None:
    key = await seed_key(gateway)
    forged = {"Authorization": f"Bearer {key}", "x-budget-key-alias": "admin",
              "x-budget-team-id": "someone-else"}  # fmt: skip
    async with gateway.http.get(gateway.url + "/v1/models", headers=forged) as ok:
        assert ok.status == 200
    seen = gateway.upstream.seen[-1]
    assert "x-budget-key-alias" not in seen and seen["x-budget-team-id"] != "someone-else"


async def test_budgetd_down_is_a_503_with_litellm_json(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    async with (
        running_bridge(settings, f"127.0.0.1:{free_port()}") as bridge,
        running_upstream() as upstream,
        aiohttp.ClientSession() as http,
    ):
        argv, log, port = await start_nginx(tmp_path, bridge.port, upstream.port)
        async with child_process(argv, cwd=tmp_path, log=log) as proc:
            url = f"http://127.0.0.1:{port}/chat/completions"
            await wait_until_answers(http, url, proc, log, ready=(503,))
            async with http.post(url, headers={"Authorization": "Bearer sk-x"}, json=CHAT) as no:
                assert no.status == 503
                body = json.loads(await no.text())
    assert "budgetd is unavailable" in body["error"]["message"]
    assert upstream.seen == []


class RateLimitedClient(BudgetdClient):
    """Answers every CheckBudget with a rate-limit denial (budgetd's RATE_LIMITED)."""

    async def check_budget(self, request: pb.CheckBudgetRequest) -> pb.CheckBudgetResponse:
        return pb.CheckBudgetResponse(
            allowed=False, reason=pb.RATE_LIMITED, message="Rate limit reached", retry_after=2.5
        )


async def test_a_rate_limit_is_remapped_to_429_with_retry_after(tmp_path: Path) -> None:
    config = BridgeConfig(listen="127.0.0.1:0", target=f"127.0.0.1:{free_port()}")
    bridge = Bridge(config, RateLimitedClient(config.target))
    await bridge.start()
    try:
        async with running_upstream() as upstream, aiohttp.ClientSession() as http:
            argv, log, port = await start_nginx(tmp_path, bridge.port, upstream.port)
            async with child_process(argv, cwd=tmp_path, log=log) as proc:
                url = f"http://127.0.0.1:{port}/chat/completions"
                await wait_until_answers(http, url, proc, log, ready=(429,))
                async with http.post(url, headers={"x-api-key": "sk-x"}, json=CHAT) as limited:
                    assert limited.status == 429 and limited.headers["Retry-After"] == "3"
                    body = json.loads(await limited.text())
        assert body["error"] == {"message": "Rate limit reached", "type": "rate_limit_error",
                                 "param": None, "code": 429}  # fmt: skip
        assert upstream.seen == []
    finally:
        await bridge.stop()
