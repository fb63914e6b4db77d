"""Structured logs: JSON lines with the request_id, key alias, team, decision and latency of
every decision and recorded spend, lifecycle events, and the level set by --log-level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ADMIN, make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc
from server.logging_setup import JsonFormatter, configure
from services import free_port

BUDGETD = Path(sys.executable).parent / "budgetd"


def test_a_record_becomes_one_json_line_with_its_extra_fields() -> None:
    record = logging.LogRecord("budgetd.requests", logging.INFO, "f.py", 1, "hi %s", ("x",), None)
    record.request_id = "req-1"
    record.latency_ms = 0.25
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "hi x" and data["level"] == "info"
    assert data["logger"] == "budgetd.requests"
    assert (data["request_id"], data["latency_ms"]) == ("req-1", 0.25)
    assert data["ts"].endswith("Z")


def test_tracebacks_and_odd_values_stay_on_one_line() -> None:
    stream = io.StringIO()
    setup = configure("info", stream)
    try:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            logging.getLogger("budgetd.test").exception("failed", extra={"thing": object()})
    finally:
        setup.close()
    (line,) = stream.getvalue().splitlines()
    data = json.loads(line)
    assert "ValueError: boom" in data["exc"] and data["thing"].startswith("<object")


async def test_each_decision_and_spend_is_logged_with_its_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="budgetd.requests")
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="QA Prod Bot", max_budget=1e-9), metadata=ADMIN
        )
        key = await running.stub.IssueKey(
            pb.IssueKeyRequest(team_id=team.team_id, key_alias="bot"), metadata=ADMIN
        )
        check = await running.stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=key.key, request_id="req-1")
        )
        await running.stub.RecordSpend(
            pb.RecordSpendRequest(
                request_id="req-1", reservation_id=check.reservation_id, cost=3.5e-6
            )
        )
        await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key, request_id="req-2"))
    records = [r for r in caplog.records if r.name == "budgetd.requests"]
    fields = [{k: getattr(r, k, None) for k in _FIELDS} for r in records]
    assert [(f["event"], f["request_id"], f["decision"]) for f in fields] == [
        ("decision", "req-1", "allowed"),
        ("spend", "req-1", None),
        ("decision", "req-2", "denied"),
    ]
    assert all(f["key_alias"] == "bot" and f["team_id"] == team.team_id for f in fields)
    assert fields[2]["reason"] == "BUDGET_EXCEEDED" and fields[2]["scope"] == "team"
    assert getattr(records[1], "cost_usd", None) == 3.5e-06
    assert all(isinstance(f["latency_ms"], float) for f in fields)


_FIELDS = (
    "event",
    "request_id",
    "decision",
    "key_alias",
    "team_id",
    "reason",
    "scope",
    "latency_ms",
)


async def _run_up(tmp_path: Path, level: str) -> list[dict[str, Any]]:
    """``budgetd up --log-level LEVEL``, one check with request_id "cli-1", then SIGTERM;
    every stderr line, parsed (each must be JSON)."""
    port = free_port()
    env = {"BUDGETD_DATA_DIR": str(tmp_path / "data"), "BUDGETD_MASTER_KEY": "sk-1234"}
    env["PATH"] = "/usr/bin:/bin"
    proc = await asyncio.create_subprocess_exec(
        str(BUDGETD), "up", "--log-level", level, "--grpc-addr", f"127.0.0.1:{port}",
        "--metrics-addr", "127.0.0.1:0", "--listen", f"127.0.0.1:{free_port()}",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=30
            )
            stub = budgetd_pb2_grpc.BudgetAuthorityStub(channel)
            team = await stub.CreateTeam(pb.CreateTeamRequest(team_alias="t"), metadata=ADMIN)
            key = await stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
            await stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key, request_id="cli-1"))
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    return [json.loads(line) for line in err.decode().splitlines()]


async def test_budgetd_up_writes_json_lines_with_lifecycle_events(tmp_path: Path) -> None:
    lines = await _run_up(tmp_path, "info")
    events = [line.get("event") for line in lines]
    assert events.index("started") < events.index("decision") < events.index("stopping")
    assert events[-1] == "stopped"
    started = lines[events.index("started")]
    assert started["admin_ui"].endswith("/ui/") and started["grpc_port"] > 0
    (decision,) = [line for line in lines if line.get("event") == "decision"]
    assert decision["request_id"] == "cli-1" and decision["decision"] == "allowed"


async def test_log_level_warning_leaves_out_the_per_request_lines(tmp_path: Path) -> None:
    lines = await _run_up(tmp_path, "warning")
    assert all(line["level"] in ("warning", "error") for line in lines)
    assert not [line for line in lines if line.get("event") == "decision"]
