"""The issue's "done when": the seed's curl commands, changed only in host and port, work
against ``make run`` + the example Envoy config.

Real processes throughout: ``budgetd up --config examples/config.yaml`` (what ``make run``
starts, with the example config's price table), Envoy from examples/envoy/envoy-grpc.yaml in
front of the fake OpenAI-compatible upstream, and the real ``curl`` running the seed's three
commands through bash, as a reader pastes them. ``/team/new`` and ``/key/generate`` go to the
bridge, ``/chat/completions`` to Envoy. Only ``0.0.0.0:4000`` changes (to the port under
test), and the ids a reader copies from one answer into the next command.

curl's output options (``--silent``, ``--write-out`` for the status, a time limit, no proxy)
come from a ``.curlrc`` in ``CURL_HOME``, so the command lines stay the seed's own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge_harness import EXAMPLES, SEED_DENIAL, child_process, wait_until_answers
from envoy_harness import EnvoyProcess, free_ports, render_example
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.timeout(60)

BUDGETD = Path(sys.executable).parent / "budgetd"
SEED_HOST = "0.0.0.0:4000"
SEED_TEAM_ID = "de35b29e-6ca8-4f47-b804-2b79d07aa99a"
SEED_KEY = "sk-..."

# The seed's commands as written there (README.md of the seed, steps 1 to 3).
TEAM_NEW = r"""curl -X POST 'http://0.0.0.0:4000/team/new' \
  -H 'Authorization: Bearer sk-1234' -H 'Content-Type: application/json' \
  -d '{"team_alias": "QA Prod Bot", "max_budget": 0.000000001, "budget_duration": "1d"}'
"""
KEY_GENERATE = r"""curl -X POST 'http://0.0.0.0:4000/key/generate' \
  -H 'Authorization: Bearer sk-1234' -H 'Content-Type: application/json' \
  -d '{"team_id": "de35b29e-6ca8-4f47-b804-2b79d07aa99a"}'
"""
CHAT = r"""curl -X POST 'http://0.0.0.0:4000/chat/completions' \
  -H 'Authorization: Bearer sk-...' -H 'Content-Type: application/json' \
  -d '{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}'
"""

# Observation only: the requests themselves are the seed's.
CURLRC = """\
silent
show-error
write-out = "\\n%{http_code}"
max-time = 10
noproxy = "*"
"""


@dataclass
class Curl:
    """Runs a seed command with bash and the real curl, in a clean environment."""

    env: dict[str, str]

    async def run(self, command: str, **replace: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of ``command`` (see :meth:`run_text`)."""
        status, body = await self.run_text(command, **replace)
        answer: dict[str, Any] = json.loads(body)
        return status, answer

    async def run_text(self, command: str, **replace: str) -> tuple[int, str]:
        """(HTTP status, body) of ``command`` with each ``old=new`` of ``replace`` applied
        (each ``old`` must occur, so the seed's text cannot drift unnoticed)."""
        for old, new in replace.items():
            assert old in command, f"{old!r} not in {command!r}"
            command = command.replace(old, new)
        proc = await asyncio.create_subprocess_exec(
            "bash", "-euo", "pipefail", "-c", command, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, f"curl failed ({proc.returncode}): {err.decode()}"
        # The body, then the status on a line of its own (the .curlrc's write-out).
        body, _, status = out.decode().rpartition("\n")
        return int(status), body


def curl_env(tmp_path: Path) -> dict[str, str]:
    """The environment curl runs in: no proxies, and our ``.curlrc`` (not the user's)."""
    home = tmp_path / "curl"
    home.mkdir()
    (home / ".curlrc").write_text(CURLRC)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["CURL_HOME"] = str(home)
    return env


def budgetd_env(tmp_path: Path) -> dict[str, str]:
    """``make run``'s environment: none of the developer's budgetd settings, the seed's
    master key, and a throwaway data directory."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUDGETD_", "LITELLM_", "DATABASE_URL", "REDIS_URL", "JWT_"))
    }
    env["LITELLM_MASTER_KEY"] = "sk-1234"
    env["BUDGETD_DATA_DIR"] = str(tmp_path / "data")
    return env


@dataclass
class Ports:
    grpc: int
    metrics: int
    bridge: int
    envoy: int
    envoy_admin: int


@asynccontextmanager
async def make_run_and_envoy(tmp_path: Path) -> AsyncIterator[tuple[Ports, FakeOpenAI]]:
    """``budgetd up`` with the example config, the fake upstream, and the example Envoy."""
    ports = Ports(*free_ports(5))
    upstream = FakeOpenAI()
    await upstream.start()
    log = tmp_path / "budgetd.log"
    argv = [
        str(BUDGETD), "up", "--config", str(EXAMPLES / "config.yaml"),
        "--grpc-addr", f"127.0.0.1:{ports.grpc}",
        "--metrics-addr", f"127.0.0.1:{ports.metrics}",
        "--listen", f"127.0.0.1:{ports.bridge}",
    ]  # fmt: skip
    try:
        async with (
            child_process(argv, cwd=tmp_path, log=log, env=budgetd_env(tmp_path)) as budgetd,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http,
        ):
            # Ready when the bridge finds budgetd SERVING.
            ready = f"http://127.0.0.1:{ports.bridge}/health/readiness"
            await wait_until_answers(http, ready, budgetd, log)
            config = render_example(
                "envoy-grpc.yaml",
                budgetd_port=ports.grpc,
                upstream_port=upstream.port,
                listen_port=ports.envoy,
                admin_port=ports.envoy_admin,
            )
            async with EnvoyProcess(config, ports.envoy_admin) as envoy:
                try:
                    yield ports, upstream
                except BaseException as exc:
                    exc.add_note(f"--- envoy log ---\n{envoy.log_tail()}")
                    exc.add_note(f"--- budgetd log ---\n{log.read_text()[-4000:]}")
                    raise
    finally:
        await upstream.stop()


async def test_the_seed_curl_commands_against_make_run_and_the_example_envoy(
    tmp_path: Path,
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (.ci/run installs Debian's curl)")
    curl = Curl(curl_env(tmp_path))
    async with make_run_and_envoy(tmp_path) as (ports, upstream):
        bridge, envoy = f"127.0.0.1:{ports.bridge}", f"127.0.0.1:{ports.envoy}"

        status, team = await curl.run(TEAM_NEW, **{SEED_HOST: bridge})
        assert status == 200, team
        assert team["team_alias"] == "QA Prod Bot"
        assert team["max_budget"] == 1e-09  # what was sent, not the seed's misprinted 0.0001
        assert team["budget_duration"] == "1d"
        # "1d" resets at the next midnight UTC.
        reset = dt.datetime.fromisoformat(team["budget_reset_at"])
        now = dt.datetime.now(dt.UTC)
        assert reset.utcoffset() == dt.timedelta(0) and reset.time() == dt.time(0)
        assert now < reset <= now + dt.timedelta(days=1)
        team_id = team["team_id"]

        status, key = await curl.run(KEY_GENERATE, **{SEED_HOST: bridge, SEED_TEAM_ID: team_id})
        assert status == 200, key
        assert key["team_id"] == team_id and key["key"].startswith("sk-")

        through_envoy = {SEED_HOST: envoy, SEED_KEY: key["key"]}
        status, first = await curl.run(CHAT, **through_envoy)
        assert status == 200, first
        assert first["usage"]["prompt_tokens"] == 15  # 3.5e-06 USD at the example's price

        status, second = await curl.run_text(CHAT, **through_envoy)
        assert (status, second) == (400, SEED_DENIAL)
        assert len(upstream.requests) == 1  # the denied request never reached it
