"""gRPC load from Python, for what h2load cannot send: a unique request id per call.

RecordSpend counts once per ``request_id``, so a fixed frame replayed by h2load would be
one spend and many duplicates. This client (``grpc.aio``, run as separate processes so it
does not share the server's interpreter) sends CheckBudget or RecordSpend with a fresh
``request_id`` on every call, cycling through a list of API keys, with at most
``--concurrency`` calls in flight. RecordSpend goes by ``api_key`` with a cost of 1e-9 USD;
budgetd acknowledges it after the ledger insert commits. CheckBudget is measured by the same
client so that the record/check ratio compares like with like.

``--sweep`` sends one call per key (each key once, in order) instead of running for a fixed
time: the bench uses it to make budgetd resolve many distinct keys.

As a module: :func:`run_grpc_load` starts the processes and merges their figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

import bench
from bench.h2load import TIMEOUT_MARGIN, LoadError
from bench.stats import Result
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc

RPC_TIMEOUT = 10.0
MODEL = "llama3"
COST = 1e-9
ESTIMATE = 1e-9


@dataclass
class Tally:
    """What one client process saw in its measured period."""

    ok: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0


class Load:
    """The calls of one client process."""

    def __init__(self, stub: Any, rpc: str, keys: list[str], prefix: str) -> None:
        self._stub = stub
        self._rpc = rpc
        self._keys = keys
        self._prefix = prefix
        self._next = 0

    async def call(self) -> str | None:
        """One call; None on success, else what went wrong (a gRPC code, denied, duplicate)."""
        index = self._next
        self._next += 1
        key = self._keys[index % len(self._keys)]
        request_id = f"{self._prefix}-{index}"
        try:
            if self._rpc == "check":
                answer = await self._stub.CheckBudget(
                    pb.CheckBudgetRequest(
                        api_key=key, model=MODEL, estimated_cost=ESTIMATE, request_id=request_id
                    ),
                    timeout=RPC_TIMEOUT,
                )
                return None if answer.allowed else f"denied:{pb.Reason.Name(answer.reason)}"
            spend = await self._stub.RecordSpend(
                pb.RecordSpendRequest(request_id=request_id, api_key=key, cost=COST, model=MODEL),
                timeout=RPC_TIMEOUT,
            )
            return "duplicate" if spend.duplicate else None
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def _timed(load: Load, tally: Tally, *, start: float, end: float) -> None:
    """Call until ``end``; count the calls that finish in [start, end]."""
    while (now := time.perf_counter()) < end:
        problem = await load.call()
        done = time.perf_counter()
        if start <= done <= end:
            if problem is None:
                tally.ok += 1
                tally.latencies_ms.append((done - now) * 1000)
            else:
                tally.failed += 1
                tally.errors[problem] += 1


async def _sweep(load: Load, tally: Tally, remaining: list[int]) -> None:
    """Call until ``remaining[0]`` calls have been sent (by every worker together)."""
    while remaining[0] > 0:
        remaining[0] -= 1
        started = time.perf_counter()
        problem = await load.call()
        if problem is None:
            tally.ok += 1
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        else:
            tally.failed += 1
            tally.errors[problem] += 1


async def drive(
    target: str,
    rpc: str,
    keys: list[str],
    *,
    concurrency: int,
    seconds: float,
    warmup: float,
    sweep: bool,
) -> Tally:
    """Drive ``target`` from this process; see the module docstring."""
    tally = Tally()
    prefix = f"bench-{secrets.token_hex(6)}-{os.getpid()}"
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        load = Load(pb_grpc.BudgetAuthorityStub(channel), rpc, keys, prefix)
        began = time.perf_counter()
        if sweep:
            remaining = [len(keys)]
            await asyncio.gather(*(_sweep(load, tally, remaining) for _ in range(concurrency)))
            tally.seconds = time.perf_counter() - began
        else:
            start = began + warmup
            end = start + seconds
            await asyncio.gather(
                *(_timed(load, tally, start=start, end=end) for _ in range(concurrency))
            )
            tally.seconds = seconds
    return tally


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.grpc_load``: drive, then write the tally as JSON to ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--rpc", choices=("check", "record"), required=True)
    parser.add_argument("--keys-file", type=Path, required=True, help="one API key per line")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--sweep", action="store_true", help="one call per key, then stop")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    keys = [line for line in args.keys_file.read_text().splitlines() if line]
    tally = asyncio.run(
        drive(
            args.target,
            args.rpc,
            keys,
            concurrency=args.concurrency,
            seconds=args.seconds,
            warmup=args.warmup,
            sweep=args.sweep,
        )
    )
    args.out.write_text(
        json.dumps(
            {
                "ok": tally.ok,
                "failed": tally.failed,
                "errors": dict(tally.errors),
                "seconds": tally.seconds,
                "latencies_ms": tally.latencies_ms,
            }
        )
    )
    return 0


async def run_grpc_load(
    target: str,
    rpc: str,
    keys_file: Path,
    workdir: Path,
    *,
    processes: int,
    concurrency: int,
    seconds: float,
    warmup: float,
    sweep: bool = False,
    time_limit: float | None = None,
) -> Result:
    """Run ``processes`` client processes (``concurrency`` calls in flight in all) and merge
    their figures. With ``sweep`` the keys are split between the processes."""
    text = await asyncio.to_thread(keys_file.read_text)
    keys = [line for line in text.splitlines() if line]
    per_process = max(1, concurrency // processes)
    runs: list[tuple[asyncio.subprocess.Process, Path]] = []
    try:
        for index in range(processes):
            out = workdir / f"grpc-load-{rpc}-{index}.json"
            own_keys = keys_file
            if sweep:
                own_keys = workdir / f"grpc-load-keys-{index}.txt"
                own_keys.write_text("\n".join(keys[index::processes]) + "\n")
            argv = [
                sys.executable, "-m", "bench.grpc_load",
                "--target", target, "--rpc", rpc, "--keys-file", str(own_keys),
                "--concurrency", str(per_process), "--seconds", f"{seconds:g}",
                "--warmup", f"{warmup:g}", "--out", str(out),
                *(["--sweep"] if sweep else []),
            ]  # fmt: skip
            process = await asyncio.create_subprocess_exec(
                *argv, cwd=bench.ROOT, stdin=asyncio.subprocess.DEVNULL
            )
            runs.append((process, out))
        limit = time_limit if time_limit is not None else seconds + warmup + TIMEOUT_MARGIN
        async with asyncio.timeout(limit):
            codes = [await process.wait() for process, _ in runs]
    finally:
        for process, _ in runs:
            if process.returncode is None:
                process.kill()
                await process.wait()
    if any(codes):
        raise LoadError(f"grpc_load {rpc} against {target} failed (exit codes {codes})")
    return _merge([json.loads(out.read_text()) for _, out in runs], sweep=sweep)


def _merge(tallies: list[dict[str, Any]], *, sweep: bool) -> Result:
    ok = sum(int(each["ok"]) for each in tallies)
    failed = sum(int(each["failed"]) for each in tallies)
    seconds = max(float(each["seconds"]) for each in tallies)
    latencies = [value for each in tallies for value in each["latencies_ms"]]
    result = Result.from_latencies("grpc_load", seconds, ok, failed, latencies)
    if not sweep:
        result.rps = sum(int(each["ok"]) / float(each["seconds"]) for each in tallies)
    errors: Counter[str] = Counter()
    for each in tallies:
        errors.update(each["errors"])
    result.notes += [f"{count} {name}" for name, count in errors.most_common()]
    return result


if __name__ == "__main__":
    sys.exit(main())
