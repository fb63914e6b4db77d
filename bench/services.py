"""The processes the bench runs: budgetd, the floor, and the test suite's Postgres and Redis.

Every process listens on 127.0.0.1 only, on a free port, writes its output to a log file in
the run's temporary directory and is started in a session of its own, so that stopping it
(SIGTERM, then SIGKILL) reaches the workers a ``budgetd serve --workers N`` forks, and no
other process. Postgres and Redis are :class:`services.PostgresServer` and
:class:`services.RedisServer` from ``tests/services.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import bench
from services import HOST, PostgresServer, RedisServer, ServiceError, free_port

__all__ = [
    "HOST",
    "BudgetdProcess",
    "FloorProcess",
    "ManagedProcess",
    "PostgresServer",
    "RedisServer",
    "ServiceError",
    "budgetd_supports_workers",
    "free_port",
    "rss_mb",
    "wait_serving",
]

BIN = Path(sys.executable).parent
BUDGETD = BIN / "budgetd"
MASTER_KEY = "sk-bench-master-key"
"""The master key of the bench's budgetd (throwaway, loopback only)."""
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class ManagedProcess:
    """A child process in a session of its own, its output in ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (of the leader, for a forking server)."""
        if self.process is None:
            raise ServiceError(f"{self.name} is not running")
        return self.process.pid

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Spawn the process (returns at once; see :func:`wait_serving`)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=bench.ROOT,
                env=self.env,
                start_new_session=True,
            )

    async def stop(self) -> None:
        """SIGTERM to the process's session, SIGKILL after STOP_TIMEOUT seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)
        # Forked workers that outlived their leader.
        _signal_group(process.pid, signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the process's output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def wait_serving(
    target: str, process: ManagedProcess, time_limit: float = READY_TIMEOUT, interval: float = 0.01
) -> None:
    """Poll ``grpc.health.v1`` at ``target`` until it answers SERVING."""
    deadline = time.monotonic() + time_limit
    # A refused connect puts a channel in reconnect backoff (1 s, then 1.6 s, ±20 %): with
    # gRPC's defaults a cold start would read ~1 s or ~2.6 s, not when budgetd began serving.
    fast_retry = [
        ("grpc.initial_reconnect_backoff_ms", 10),
        ("grpc.min_reconnect_backoff_ms", 10),
        ("grpc.max_reconnect_backoff_ms", 50),
    ]
    async with grpc.aio.insecure_channel(target, options=fast_retry) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if not process.alive:
                raise ServiceError(f"{process.name} exited while starting:\n{process.log_tail()}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{process.name} not SERVING after {time_limit:.0f}s:\n{process.log_tail()}"
                )
            await asyncio.sleep(interval)


def budgetd_supports_workers() -> bool:
    """True when ``budgetd serve`` has the ``--workers`` flag (issue 7, item 3)."""
    done = subprocess.run(
        [str(BUDGETD), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=bench.ROOT,
    )
    return "--workers" in done.stdout


class BudgetdProcess(ManagedProcess):
    """``budgetd serve`` against the bench's Postgres and Redis, on a free loopback port.

    Its config file sets ``log_level: warning`` (no per-request log lines) and
    ``reservation_ttl: 30s`` (see below), and puts the data and spool directories in the
    run's temporary directory; metrics stay on (as deployed), on ``metrics_port`` (0: any
    free port, for forked workers).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        database_url: str,
        redis_url: str,
        *,
        workers: int | None = None,
        metrics_port: int = 0,
    ) -> None:
        self.port = free_port()
        self.metrics_port = metrics_port
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "budgetd.yaml"
        # The load never settles its checks (no RecordSpend follows them): holds of 10 s, not
        # the default 10 min, keep the backlog of unsettled holds near what a gateway that
        # reports back leaves. Past 200,000 leased requests out each check goes to Redis, and
        # 30 s holds reached that on a machine doing ~9,000 checks/s: from the second round
        # on, budgetd and not the floor was measured against that backlog (-15 to -35 %).
        config.write_text(
            "budgetd:\n"
            "  log_level: warning\n"
            "  reservation_ttl: 10s\n"
            f"  metrics_addr: {HOST}:{metrics_port}\n"
            f"  data_dir: {directory / 'data'}\n"
        )
        argv = [str(BUDGETD), "serve", "--config", str(config), "--grpc-addr", self.target]
        if workers is not None:
            argv += ["--workers", str(workers)]
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BUDGETD_", "LITELLM_", "DATABASE_URL", "REDIS_URL"))
        }
        env.update(DATABASE_URL=database_url, REDIS_URL=redis_url, BUDGETD_MASTER_KEY=MASTER_KEY)
        super().__init__(name, argv, directory / "budgetd.log", env)

    @property
    def target(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{HOST}:{self.port}"

    async def start_serving(self) -> float:
        """Spawn budgetd and wait for SERVING; returns the seconds that took (cold start)."""
        started = time.perf_counter()
        self.start()
        await wait_serving(self.target, self)
        return time.perf_counter() - started


class FloorProcess(ManagedProcess):
    """``python -m bench.floor`` on a free loopback port (see :mod:`bench.floor`)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "bench.floor", "--port", str(self.port)]
        super().__init__("floor", argv, workdir / "floor.log")

    @property
    def target(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{HOST}:{self.port}"

    async def start_serving(self) -> None:
        """Spawn the floor and wait for SERVING."""
        self.start()
        await wait_serving(self.target, self)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--workers`` leader and its workers)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def _status_mb(pid: int, field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """The largest ``field`` (VmRSS, VmHWM) in MiB of one process of ``pid``'s tree: with
    ``--workers`` that is one worker (or the leader), as the target is stated per worker."""
    return max(_status_mb(each, field) for each in process_tree(pid))
