"""gRPC load with h2load (Debian's ``nghttp2-client``): one prebuilt frame, posted repeatedly.

h2load knows nothing of gRPC: it posts the file given to ``--data`` on every stream, so the
request is a gRPC frame built in advance (a 0 flag byte, the 4-byte big-endian length, the
serialised message) and sent with ``content-type: application/grpc`` and ``te: trailers``.
Every request is identical, so this suits CheckBudget (no unique id needed) but not
RecordSpend (see :mod:`bench.grpc_load`). h2load counts HTTP statuses only; the gRPC status
is in the trailers, so :func:`grpc_status` checks the very same bytes once with ``nghttp``,
and the run checks budgetd's own decision counters around the load.

Latency percentiles come from ``--log-file`` (one line per request of the measured period,
warm-up excluded): start time, HTTP status, microseconds to the end of the response.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
from pathlib import Path

from google.protobuf.message import Message

from bench.stats import Result

TIMEOUT_MARGIN = 60.0


class LoadError(RuntimeError):
    """A load generator failed or its output could not be read."""


def grpc_frame(message: Message) -> bytes:
    """The length-prefixed gRPC message (uncompressed) that carries ``message``."""
    payload = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def grpc_headers() -> list[str]:
    """The request headers a gRPC server requires (with ``--data`` h2load POSTs)."""
    return ["content-type: application/grpc", "te: trailers"]


async def run_command(argv: list[str], time_limit: float) -> str:
    """Run a load generator; its stdout (stderr joined), or LoadError on failure or timeout."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), time_limit)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise LoadError(f"{argv[0]} exited with {process.returncode}:\n{text[-2000:]}")
    return text


async def grpc_status(url: str, frame_file: Path) -> int:
    """The ``grpc-status`` trailer of one POST of ``frame_file`` to ``url`` (via ``nghttp``)."""
    nghttp = shutil.which("nghttp")
    if nghttp is None:
        raise LoadError("nghttp not found: install Debian's nghttp2-client")
    argv = [nghttp, "-v", "-n", "-d", str(frame_file)]
    for header in grpc_headers():
        argv += ["-H", header]
    text = await run_command([*argv, url], time_limit=30)
    found = re.search(r"recv \(stream_id=\d+\) grpc-status: (\d+)", text)
    if found is None:
        raise LoadError(f"no grpc-status in nghttp's answer from {url}:\n{text[-2000:]}")
    return int(found.group(1))


def _parse_summary(text: str) -> tuple[int, int, int]:
    """(succeeded, failed + errored + timeout, 2xx) from h2load's summary."""
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        text,
    )
    statuses = re.search(r"status codes: (\d+) 2xx", text)
    if counts is None or statuses is None:
        raise LoadError(f"cannot read h2load's summary:\n{text[-2000:]}")
    succeeded, failed, errored, timeout = (int(value) for value in counts.groups())
    return succeeded, failed + errored + timeout, int(statuses.group(1))


def _read_log(path: Path) -> list[float]:
    """Latencies in ms of the 2xx requests in h2load's ``--log-file`` (then removed)."""
    latencies: list[float] = []
    text = path.read_text()
    path.unlink()
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].startswith("2"):
            latencies.append(int(fields[2]) / 1000)
    return latencies


def _duration(seconds: float) -> str:
    """h2load's duration syntax (it takes no fractional numbers: 2.5 s is "2500ms")."""
    return f"{round(seconds * 1000)}ms"


async def run_h2load(
    url: str,
    frame_file: Path,
    *,
    clients: int,
    streams: int,
    seconds: float,
    warmup: float,
    log_file: Path,
) -> Result:
    """``h2load`` for ``seconds`` after ``warmup`` seconds, ``clients`` connections with
    ``streams`` concurrent streams each; throughput over the measured period only."""
    h2load = shutil.which("h2load")
    if h2load is None:
        raise LoadError("h2load not found: install Debian's nghttp2-client")
    argv = [
        h2load,
        "--duration", _duration(seconds),
        *(["--warm-up-time", _duration(warmup)] if warmup > 0 else []),
        "--clients", str(clients),
        "--max-concurrent-streams", str(streams),
        "--threads", "1",
        "--data", str(frame_file),
        "--log-file", str(log_file),
    ]  # fmt: skip
    for header in grpc_headers():
        argv += ["--header", header]
    text = await run_command([*argv, url], time_limit=seconds + warmup + TIMEOUT_MARGIN)
    succeeded, failed, ok_2xx = _parse_summary(text)
    latencies = await asyncio.to_thread(_read_log, log_file)
    failures = failed + succeeded - ok_2xx
    return Result.from_latencies("h2load", seconds, ok_2xx, failures, latencies)
