"""The budgetd command line as a user runs it: help, config errors, serve, SIGTERM, migrate."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.storage.postgres_migrations import load_migrations
from services import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "config"
BUDGETD = str(Path(sys.executable).parent / "budgetd")


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without any budgetd/LiteLLM settings of the developer's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUDGETD_", "LITELLM_", "DATABASE_URL", "REDIS_URL", "JWT_"))
    }
    env["BUDGETD_DATA_DIR"] = str(tmp_path / "data")
    env.update(extra)
    return env


async def run(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        BUDGETD, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_names_every_command_and_the_storage_choice(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    helps = await asyncio.gather(
        run("--help", env=env),
        run("serve", "--help", env=env),
        run("bridge", "--help", env=env),
        run("up", "--help", env=env),
    )
    assert [code for code, _, _ in helps] == [0, 0, 0, 0]
    top, serve, bridge, up = (out for _, out, _ in helps)
    for word in ("serve", "up", "bridge", "migrate", "DATABASE_URL", "BUDGETD_MASTER_KEY"):
        assert word in top
    assert "--grpc-addr" in serve and "--config" in serve
    assert "--listen" in bridge and "--target" in bridge and "/nginx/auth" in bridge
    assert "--listen" in up and "--grpc-addr" in up


async def test_a_bad_config_stops_the_start_naming_the_key_and_the_file(tmp_path: Path) -> None:
    bad = FIXTURES / "bad_enforcement.yaml"
    code, _, err = await run("serve", "--config", str(bad), env=clean_env(tmp_path))
    assert code == 2
    assert str(bad) in err and "budgetd.enforcement" in err and "sometimes" in err


async def test_serve_answers_health_then_drains_and_exits_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(tmp_path, BUDGETD_MASTER_KEY="sk-test")
    proc = await asyncio.create_subprocess_exec(
        BUDGETD, "serve", "--grpc-addr", f"127.0.0.1:{port}", "--metrics-addr", "127.0.0.1:0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service="budgetd.v1.BudgetAuthority"),
                wait_for_ready=True,
                timeout=30,
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert "shutting down" in err.decode()
    assert (tmp_path / "data" / "budgetd.sqlite3").exists()


async def test_migrate_applies_postgres_migrations_once(tmp_path: Path, database_url: str) -> None:
    env = clean_env(tmp_path, DATABASE_URL=database_url)
    code, out, err = await run("migrate", env=env)
    assert code == 0, err
    # Every shipped migration, in order (the list grows as the schema does).
    shipped = [version for version, _ in load_migrations()]
    assert shipped[0] == 1 and f"applied {shipped}" in out
    code, out, _ = await run("migrate", env=env)
    assert code == 0 and "nothing (up to date)" in out


async def test_migrate_creates_the_embedded_database(tmp_path: Path) -> None:
    code, out, err = await run("migrate", env=clean_env(tmp_path))
    assert code == 0, err
    assert "budgetd.sqlite3" in out
    assert (tmp_path / "data" / "budgetd.sqlite3").exists()


async def test_serve_refuses_to_start_when_postgres_is_unreachable(tmp_path: Path) -> None:
    env = clean_env(tmp_path, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    code, _, err = await run("serve", "--grpc-addr", "127.0.0.1:0", env=env)
    assert code == 1
    assert "postgres unavailable" in err


async def _http_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    """Poll ``url`` until it answers 200 (fail early if the process died)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            assert proc.returncode is None, "budgetd exited early"
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(url) as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered 200")


async def _create_team(bridge_url: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            bridge_url + "/team/new",
            headers={"Authorization": "Bearer sk-test"},
            json={"team_alias": "QA Prod Bot", "max_budget": 0.000000001, "budget_duration": "1d"},
        ) as answer,
    ):
        assert answer.status == 200, await answer.text()
        return dict(await answer.json())


async def _terminate(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err.decode()


async def test_up_serves_grpc_and_the_http_bridge_in_one_process(tmp_path: Path) -> None:
    grpc_port, bridge_port = free_port(), free_port()
    env = clean_env(tmp_path, BUDGETD_MASTER_KEY="sk-test")
    proc = await asyncio.create_subprocess_exec(
        BUDGETD, "up", "--grpc-addr", f"127.0.0.1:{grpc_port}", "--metrics-addr", "127.0.0.1:0",
        "--listen", f"127.0.0.1:{bridge_port}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="budgetd.v1.BudgetAuthority"),
                wait_for_ready=True,
                timeout=30,
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        bridge = f"http://127.0.0.1:{bridge_port}"
        await _http_ready(bridge + "/health/readiness", proc)
        team = await _create_team(bridge)
        assert team["max_budget"] == 1e-09
        err = await _terminate(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert "shutting down" in err and f"asking budgetd at 127.0.0.1:{grpc_port}" in err


async def test_bridge_asks_a_running_budgetd(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, master_key="sk-test")
    async with running_server("embedded", settings) as running:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            BUDGETD, "bridge", "--listen", f"127.0.0.1:{port}", "--target", running.target,
            env=clean_env(tmp_path), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            bridge = f"http://127.0.0.1:{port}"
            await _http_ready(bridge + "/health/readiness", proc)
            team = await _create_team(bridge)
            listed = await running.stub.ListTeams(
                pb.ListTeamsRequest(), metadata=(("authorization", "Bearer sk-test"),)
            )
            assert [t.team_id for t in listed.teams] == [team["team_id"]]
            err = await _terminate(proc)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err
    assert "shutting down" in err


async def test_workers_share_one_port_and_stop_together(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    port, metrics = free_port(), free_port_pair()
    env = clean_env(
        tmp_path, BUDGETD_MASTER_KEY="sk-test", DATABASE_URL=database_url, REDIS_URL=redis_url
    )
    proc = await asyncio.create_subprocess_exec(
        BUDGETD, "serve", "--workers", "2", "--grpc-addr", f"127.0.0.1:{port}",
        "--metrics-addr", f"127.0.0.1:{metrics}", "--log-level", "warning",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await _serving_on_both(port, metrics)
    except Exception as exc:
        # Say why: a worker that failed to start stops them all, and the RPCs above only
        # time out.
        if proc.returncode is None:
            proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(
            f"budgetd serve --workers 2 (exit {proc.returncode}): {exc!r}\n{err.decode()[-4000:]}"
        ) from exc
    try:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0


async def _serving_on_both(port: int, metrics: int) -> None:
    # Each channel is one connection, which the kernel hands to one worker: several
    # channels reach both, and both workers' metrics ports (metrics, metrics + 1) answer.
    for _ in range(8):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(
                health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    async with aiohttp.ClientSession() as http:
        for worker_port in (metrics, metrics + 1):
            for _ in range(50):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{worker_port}/healthz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"worker metrics on {worker_port} never answered")


def free_port_pair() -> int:
    """A port p with p and p + 1 both free right now (worker i serves metrics on p + i)."""
    for _ in range(100):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free ports in a row")


async def test_workers_need_shared_counters_and_a_fixed_port(tmp_path: Path) -> None:
    code, _, err = await run("serve", "--workers", "2", env=clean_env(tmp_path))
    assert code == 2 and "REDIS_URL" in err
    env = clean_env(tmp_path, DATABASE_URL="postgresql://x@127.0.0.1:1/x", REDIS_URL="redis://x")
    code, _, err = await run("serve", "--workers", "2", "--grpc-addr", "127.0.0.1:0", env=env)
    assert code == 2 and "fixed gRPC port" in err
