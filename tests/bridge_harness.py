"""Test helpers for the HTTP bridge: an in-process bridge, a recording upstream, real gateways.

Gateways (nginx, Traefik) run as child processes from the example configs in ``examples/``,
rendered by replacing the example's loopback addresses with free ports, so a test that passes
proves the shipped example works.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from clients.bridge import Bridge, BridgeConfig
from server.config import Settings

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEED_TEAM = {"team_alias": "QA Prod Bot", "max_budget": 0.000000001, "budget_duration": "1d"}
SEED_DENIAL = (
    '{"error": {"message": "Budget has been exceeded! Current cost: 3.5e-06, Max budget: '
    '1e-09", "type": "auth_error", "param": null, "code": 400}}'
)
MASTER = {"Authorization": "Bearer sk-1234"}
CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}


@asynccontextmanager
async def running_bridge(settings: Settings, target: str, **changes: Any) -> AsyncIterator[Bridge]:
    """A bridge on a free loopback port asking budgetd at ``target``."""
    config = BridgeConfig.from_settings(settings, listen="127.0.0.1:0", target=target, **changes)
    bridge = Bridge(config)
    await bridge.start()
    try:
        yield bridge
    finally:
        await bridge.stop()


@dataclass
class Upstream:
    """A fake OpenAI-compatible upstream that records the headers of what reaches it."""

    port: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.append({name.lower(): value for name, value in request.headers.items()})
        return web.json_response(
            {"object": "chat.completion", "usage": {"prompt_tokens": 7, "completion_tokens": 1}}
        )


@asynccontextmanager
async def running_upstream() -> AsyncIterator[Upstream]:
    """Serve an :class:`Upstream` on a free loopback port."""
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream.port = int(runner.addresses[0][1])
    try:
        yield upstream
    finally:
        await runner.cleanup()


def render(source: Path, replacements: Mapping[str, str], destination: Path) -> Path:
    """Copy an example config to ``destination`` with each address replaced (all must occur)."""
    text = source.read_text()
    for old, new in replacements.items():
        assert old in text, f"{source} no longer contains {old!r}: update the test"
        text = text.replace(old, new)
    destination.write_text(text)
    return destination


@asynccontextmanager
async def child_process(
    argv: Sequence[str], *, cwd: Path, log: Path, env: Mapping[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run a gateway (or budgetd) in the foreground, in ``env`` (default: this process's
    environment); SIGTERM (then SIGKILL) it afterwards."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_until_answers(
    session: aiohttp.ClientSession,
    url: str,
    proc: asyncio.subprocess.Process,
    log: Path,
    *,
    ready: Sequence[int] = (200,),
    within: float = 15.0,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers one of ``ready`` (fail with the gateway's log if it dies)."""
    deadline = time.monotonic() + within
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            output = await asyncio.to_thread(log.read_text)
            raise AssertionError(f"gateway exited with {proc.returncode}:\n{output}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, headers=headers) as response:
                if response.status in ready:
                    return
                last = f"{response.status} {await response.text()}"
        await asyncio.sleep(0.1)
    output = await asyncio.to_thread(log.read_text)
    raise AssertionError(f"{url} not ready after {within}s ({last}):\n{output}")
