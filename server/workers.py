"""``budgetd serve --workers N``: N server processes sharing one port (SO_REUSEPORT).

One Python process answers gRPC on one core. To use more cores on one box, the parent starts
N copies of ``budgetd serve`` (the same arguments, plus a hidden ``--worker-index``); each
binds the same address with SO_REUSEPORT and the kernel spreads connections across them.
They are ordinary replicas: they share Postgres and Redis, so every money guarantee of
replicas holds, and nothing is shared between them in memory. Hence ``--workers`` needs
shared counters (``REDIS_URL``) and a fixed port.

Per worker: metrics on the metrics port + its index (each exposes its own process's
counters; the budget gauges are read from shared state and agree), and its own spool
directory (``<spool>/worker-<i>``), because two processes must not append to one spool.
The parent forwards SIGTERM/SIGINT, waits for the workers to drain, and stops them all if
one dies, so a supervisor (systemd, Kubernetes) sees the failure and restarts the set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace

from server.app import split_address
from server.errors import ConfigError
from server.settings import Settings

log = logging.getLogger("budgetd.workers")

STOP_TIMEOUT = 15.0


def check_workers(settings: Settings, workers: int) -> None:
    """Refuse a worker count that cannot work, with what to change."""
    if workers < 1 or workers > 64:
        raise ConfigError(f"--workers must be between 1 and 64, got {workers}")
    if workers == 1:
        return
    _, port = split_address(settings.grpc_addr)
    if port == 0:
        raise ConfigError("--workers needs a fixed gRPC port (not :0) for the workers to share")
    if not settings.redis_url or not settings.database_url:
        raise ConfigError(
            "--workers > 1 needs DATABASE_URL and REDIS_URL: the workers are replicas and "
            "must share their counters (the embedded default keeps them in one process)"
        )


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index``: its own metrics port and spool directory."""
    host, port = split_address(settings.metrics_addr)
    metrics = settings.metrics_addr
    if port and index:
        metrics = f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}"
    return replace(
        settings, metrics_addr=metrics, spool_dir=settings.spool_path / f"worker-{index}"
    )


def worker_argv(argv: Sequence[str], index: int) -> list[str]:
    """The command line of worker ``index``: the parent's, with --workers replaced."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--workers":
            skip = True
            continue
        if arg.startswith("--workers="):
            continue
        out.append(arg)
    return [sys.executable, "-m", "server.cli", *out, "--worker-index", str(index)]


async def supervise(argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` copies of this ``budgetd serve`` until SIGTERM; their worst exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    procs = [await asyncio.create_subprocess_exec(*worker_argv(argv, i)) for i in range(workers)]
    log.info(
        "started %d workers", workers, extra={"event": "workers", "pids": [p.pid for p in procs]}
    )
    waits = {asyncio.ensure_future(p.wait()): p for p in procs}
    stopping = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stopping, *waits], return_when=asyncio.FIRST_COMPLETED)
    failed = stopping not in done
    if failed:
        dead = [waits[f] for f in done if f in waits]
        log.error(
            "worker %s exited (code %s): stopping the others",
            dead[0].pid,
            dead[0].returncode,
            extra={"event": "worker_died"},
        )
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_TIMEOUT)
    except TimeoutError:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        await asyncio.gather(*(p.wait() for p in procs))
    stopping.cancel()
    codes = [p.returncode or 0 for p in procs]
    return max(1 if failed else 0, *codes)
