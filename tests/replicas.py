"""Real ``budgetd serve`` replicas against one Postgres and one Redis, and load to drive them.

:func:`start_replicas` runs N ``budgetd serve`` processes (the console script installed next
to the test interpreter) on free loopback ports, all sharing the same ``DATABASE_URL`` and
``REDIS_URL``, waits until each reports SERVING on ``grpc.health.v1``, and stops them with
SIGTERM at the end (SIGKILL if one does not exit in time). Each replica's output goes to a
log file in the test's directory, quoted when a replica fails to start.

:func:`drive_load` runs CheckBudget -> RecordSpend cycles across the replicas with bounded
concurrency and records every answer, so a test can hold the ledger and the counters to
what the replicas acknowledged. Money is generated as whole micro-USD, so every cost is
exact on the wire (``k / 1e6`` is the double closest to the decimal, and budgetd reads
wire doubles through their shortest ``repr``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import asyncpg
import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ADMIN, MASTER_KEY
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc
from server.money import decimal_to_nanos
from services import free_port

BUDGETD = Path(sys.executable).parent / "budgetd"
SERVICE = "budgetd.v1.BudgetAuthority"
START_TIMEOUT = 30.0
"""Seconds a replica may take to report SERVING."""
STOP_TIMEOUT = 10.0
"""Seconds a replica may take to exit after SIGTERM before it is killed."""
RPC_TIMEOUT = 10.0
"""Deadline of every RPC the load sends."""
NANOS_PER_MICRO = 1000
_START_ATTEMPTS = 3  # a free port may be taken by someone else before budgetd binds it
# What a replica logs when its port was taken (budgetd's message; grpcio's RuntimeError).
_BIND_FAILED = ("cannot bind", "Failed to bind")


class ReplicaError(RuntimeError):
    """A replica could not be started."""


@dataclass
class Replica:
    """One running ``budgetd serve`` process and a channel to it."""

    index: int
    port: int
    process: asyncio.subprocess.Process
    log: Path
    channel: grpc.aio.Channel | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stub(self) -> budgetd_pb2_grpc.BudgetAuthorityAsyncStub:
        """A BudgetAuthority stub on this replica's channel."""
        assert self.channel is not None, "the replica is not running"
        # The async stub type exists only in the .pyi: the plain stub is async on aio.
        return budgetd_pb2_grpc.BudgetAuthorityStub(self.channel)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Cluster:
    """The running replicas; ``returncodes`` is filled in once they have been stopped.

    ``config`` and ``envs`` are what each replica was started with, so a fault test can kill
    one (:func:`kill_replica`) and start it again with the same data directory
    (:func:`relaunch_replica`).
    """

    replicas: list[Replica]
    returncodes: list[int | None] = field(default_factory=list)
    workdir: Path = Path()
    config: Path = Path()
    envs: list[dict[str, str]] = field(default_factory=list)
    # Channels of killed replicas, closed at the end: closing one at once would cancel the
    # calls still in flight on it locally, where the load wants to see them fail.
    retired: list[grpc.aio.Channel] = field(default_factory=list)


def replica_env(
    data_dir: Path, database_url: str | None, redis_url: str | None, **extra: str
) -> dict[str, str]:
    """The environment of a replica: the caller's, minus any budgetd/LiteLLM settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BUDGETD_", "LITELLM_", "DATABASE_URL", "REDIS_URL", "JWT_"))
    }
    env["BUDGETD_DATA_DIR"] = str(data_dir)
    env["BUDGETD_MASTER_KEY"] = MASTER_KEY
    if database_url:
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra)
    return env


def write_config(
    path: Path, *, enforcement: str, reservation_ttl: float, extra_yaml: str = ""
) -> Path:
    """A config file with the ``budgetd:`` settings the replicas share (and ``extra_yaml``:
    more top-level sections, such as the seed's JWT block)."""
    path.write_text(
        f"budgetd:\n  enforcement: {enforcement}\n  reservation_ttl: {reservation_ttl}\n"
        f"  log_level: warning\n{extra_yaml}",
        encoding="utf-8",
    )
    return path


async def _serving(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE),
            wait_for_ready=True,
            timeout=START_TIMEOUT,
        )
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        raise ReplicaError(f"replica on port {port} reports {answer.status}")


async def _launch(index: int, workdir: Path, config: Path, env: dict[str, str]) -> Replica:
    """Start one replica on a free port and wait until it is SERVING (retrying a port race)."""
    for attempt in range(_START_ATTEMPTS):
        port = free_port()
        log = workdir / f"replica-{index}.log"
        with log.open("ab") as out:
            process = await asyncio.create_subprocess_exec(
                str(BUDGETD), "serve", "--config", str(config),
                "--grpc-addr", f"127.0.0.1:{port}", "--metrics-addr", "127.0.0.1:0",
                env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        replica = Replica(index, port, process, log)
        exited = asyncio.ensure_future(process.wait())
        serving = asyncio.ensure_future(_serving(port))
        await asyncio.wait({exited, serving}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done() and serving.exception() is None:
            exited.cancel()
            replica.channel = grpc.aio.insecure_channel(replica.target)
            return replica
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError, ReplicaError):
            await serving
        if not exited.done():  # not serving within the bound: give up on this process
            await _stop(replica)
            raise ReplicaError(f"replica {index} did not report SERVING:\n{replica.log_tail()}")
        tail = replica.log_tail()
        if not any(m in tail for m in _BIND_FAILED) or attempt == _START_ATTEMPTS - 1:
            raise ReplicaError(
                f"replica {index} exited with {process.returncode}:\n{replica.log_tail()}"
            )
    raise AssertionError("unreachable")


async def _stop(replica: Replica) -> int | None:
    """SIGTERM, wait up to STOP_TIMEOUT, then SIGKILL; the exit code (None if never ran)."""
    if replica.channel is not None:
        await replica.channel.close()
        replica.channel = None
    process = replica.process
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode


@asynccontextmanager
async def start_replicas(
    workdir: Path,
    *,
    database_url: str | None,
    redis_url: str | None,
    count: int = 3,
    enforcement: str = "cross_once",
    reservation_ttl: float = 60.0,
    extra_env: dict[str, str] | None = None,
    extra_yaml: str = "",
) -> AsyncIterator[Cluster]:
    """Run ``count`` replicas sharing one database and one Redis; stop them afterwards."""
    config = write_config(
        workdir / "budgetd.yaml",
        enforcement=enforcement,
        reservation_ttl=reservation_ttl,
        extra_yaml=extra_yaml,
    )
    envs = [
        replica_env(workdir / f"data-{i}", database_url, redis_url, **(extra_env or {}))
        for i in range(count)
    ]
    started = await asyncio.gather(
        *(_launch(i, workdir, config, envs[i]) for i in range(count)), return_exceptions=True
    )
    replicas = [r for r in started if isinstance(r, Replica)]
    cluster = Cluster(replicas, workdir=workdir, config=config, envs=envs)
    try:
        for result in started:
            if isinstance(result, BaseException):
                raise result
        yield cluster
    finally:
        # cluster.replicas, not replicas: a relaunched replica replaced its killed process.
        cluster.returncodes = list(await asyncio.gather(*(_stop(r) for r in cluster.replicas)))
        for channel in cluster.retired:
            await channel.close()


async def kill_replica(cluster: Cluster, index: int) -> None:
    """SIGKILL replica ``index`` (no drain, no cleanup: a crash) and reap it."""
    replica = cluster.replicas[index]
    if replica.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            replica.process.kill()
        await replica.process.wait()
    if replica.channel is not None:
        cluster.retired.append(replica.channel)
        replica.channel = None


async def relaunch_replica(cluster: Cluster, index: int, **extra_env: str) -> Replica:
    """Start replica ``index`` again (after :func:`kill_replica`) with the same config and
    data directory, plus ``extra_env``; it replaces the old one in ``cluster.replicas``."""
    old = cluster.replicas[index]
    if old.process.returncode is None:
        raise ReplicaError(f"replica {index} is still running")
    env = {**cluster.envs[index], **extra_env}
    replica = await _launch(index, cluster.workdir, cluster.config, env)
    cluster.replicas[index] = replica
    return replica


# --- admin and load ---------------------------------------------------------------------


async def create_team_and_key(
    stub: budgetd_pb2_grpc.BudgetAuthorityAsyncStub,
    *,
    max_budget: float | None,
    budget_duration: str = "",
) -> tuple[str, str]:
    """A new team (with the given budget) and an unlimited key of it: (team_id, key)."""
    team = await stub.CreateTeam(
        pb.CreateTeamRequest(
            team_alias=f"load-{uuid.uuid4().hex[:8]}",
            max_budget=max_budget,
            budget_duration=budget_duration,
        ),
        metadata=ADMIN,
        timeout=RPC_TIMEOUT,
    )
    issued = await stub.IssueKey(
        pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN, timeout=RPC_TIMEOUT
    )
    return team.team_id, issued.key


@dataclass
class LoadResult:
    """Everything the replicas answered during a load run (amounts in nano-USD)."""

    cycles: int = 0
    admitted: int = 0
    denied: int = 0
    errors: list[str] = field(default_factory=list)
    recorded: dict[str, int] = field(default_factory=dict)  # request_id -> cost, OK answers
    largest_estimate: int = 0  # of an admitted request (0 when none were sent)
    largest_cost: int = 0  # of a recorded request
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def recorded_total(self) -> int:
        return sum(self.recorded.values())


async def _cycle(
    stub: budgetd_pb2_grpc.BudgetAuthorityAsyncStub,
    key: str,
    request_id: str,
    estimate_micros: int,
    cost_micros: int,
    result: LoadResult,
    send_estimate: bool,
) -> None:
    """One gateway request: CheckBudget (with the estimate), then RecordSpend if admitted."""
    result.cycles += 1
    result.in_flight += 1
    result.max_in_flight = max(result.max_in_flight, result.in_flight)
    try:
        estimate = estimate_micros * NANOS_PER_MICRO if send_estimate else 0
        decision = await stub.CheckBudget(
            pb.CheckBudgetRequest(
                api_key=key,
                estimated_cost=estimate_micros / 1e6 if send_estimate else None,
                request_id=request_id,
            ),
            timeout=RPC_TIMEOUT,
        )
        if not decision.allowed:
            result.denied += 1
            return
        result.admitted += 1
        result.largest_estimate = max(result.largest_estimate, estimate)
        await stub.RecordSpend(
            pb.RecordSpendRequest(
                request_id=request_id,
                reservation_id=decision.reservation_id,
                cost=cost_micros / 1e6,
            ),
            timeout=RPC_TIMEOUT,
        )
        result.recorded[request_id] = cost = cost_micros * NANOS_PER_MICRO
        result.largest_cost = max(result.largest_cost, cost)
    except grpc.aio.AioRpcError as exc:
        result.errors.append(f"{request_id}: {exc.code().name}: {exc.details()}")
    finally:
        result.in_flight -= 1


async def drive_load(
    replicas: Sequence[Replica],
    key: str,
    *,
    cycles: int,
    concurrency: int,
    estimate_micros: tuple[int, int],
    rng: random.Random,
    send_estimate: bool = True,
    result: LoadResult | None = None,
) -> LoadResult:
    """Run ``cycles`` CheckBudget -> RecordSpend cycles round-robin over ``replicas``.

    At most ``concurrency`` cycles are in flight. Each estimate is drawn uniformly from
    ``estimate_micros`` (inclusive, micro-USD) and each actual cost uniformly from
    ``[0, estimate]``, so estimates are always >= actual costs. With ``send_estimate``
    false the checks carry no estimate (nothing is held), as from a gateway that cannot
    price a request before it runs.
    """
    out = result if result is not None else LoadResult()
    gate = asyncio.Semaphore(concurrency)
    prefix = uuid.uuid4().hex[:12]
    offset = out.cycles

    async def one(i: int) -> None:
        estimate = rng.randint(*estimate_micros)
        cost = rng.randint(0, estimate)
        async with gate:
            stub = replicas[i % len(replicas)].stub
            request_id = f"{prefix}-{offset + i}"
            await _cycle(stub, key, request_id, estimate, cost, out, send_estimate)

    await asyncio.gather(*(one(i) for i in range(cycles)))
    return out


# --- reading the truth ------------------------------------------------------------------


async def ledger_rows(database_url: str, team_id: str) -> dict[str, int]:
    """The team's ledger as request_id -> cost (nano-USD), read from Postgres directly."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT request_id, cost FROM spend_ledger WHERE team_id = $1", team_id
        )
    finally:
        await conn.close()
    return {row["request_id"]: decimal_to_nanos(row["cost"]) for row in rows}


async def ledger_sum(database_url: str, team_id: str) -> tuple[int, int]:
    """(row count, exact SUM(cost) in nano-USD) of the team's ledger rows."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, COALESCE(SUM(cost), 0) AS total FROM spend_ledger"
            " WHERE team_id = $1",
            team_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), decimal_to_nanos(row["total"])


async def redis_counters(redis_url: str, team_id: str) -> dict[str, tuple[int, int]]:
    """Every counter of the team in Redis as counter key -> (spend, held), read directly."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        pattern = f"*{{t:{quote(team_id, safe='')}}}:c:*"
        found: dict[str, tuple[int, int]] = {}
        async for name in client.scan_iter(match=pattern, count=1000):
            spend, held = await client.hmget(name, ["spend", "held"])
            assert isinstance(spend, str) and isinstance(held, str), (name, spend, held)
            found[name] = (int(spend), int(held))
        return found
    finally:
        await client.aclose()
