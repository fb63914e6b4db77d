"""HTTP/1.1 load through Envoy with wrk (Debian's ``wrk``), percentiles from ``--latency``.

wrk has no warm-up option: a short run whose figures are thrown away comes first. A request
that Envoy answers with anything but 2xx/3xx (a denial, a 503 when ext_authz fails) is
counted as failed (wrk's "Non-2xx or 3xx responses").
"""

from __future__ import annotations

import re
import shutil

from bench.h2load import TIMEOUT_MARGIN, LoadError, run_command
from bench.stats import Result

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk(text: str) -> Result:
    """A Result from wrk's report (printed with ``--latency``)."""
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if total is None:
        raise LoadError(f"cannot read wrk's report:\n{text[-2000:]}")
    requests = int(total.group(1))
    seconds = _ms(total.group(2), total.group(3)) / 1000
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    errors = sum(int(value) for value in sockets.groups()) if sockets else 0
    percentiles = {
        int(pct): _ms(value, unit)
        for pct, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    }
    ok = requests - failed
    result = Result(
        tool="wrk",
        seconds=seconds,
        ok=ok,
        failed=failed + errors,
        rps=ok / seconds if seconds > 0 else 0.0,
        p50_ms=percentiles.get(50, float("nan")),
        p90_ms=percentiles.get(90, float("nan")),
        p99_ms=percentiles.get(99, float("nan")),
    )
    if errors:
        result.notes.append(f"{errors} socket errors")
    return result


async def run_wrk(
    url: str, headers: list[str], *, connections: int, seconds: float, warmup: float
) -> Result:
    """``wrk -t1 -c connections`` against ``url``: ``warmup`` seconds discarded, then
    ``seconds`` measured."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise LoadError("wrk not found: install Debian's wrk")
    base = [wrk, "--threads", "1", "--connections", str(connections), "--timeout", "5s"]
    for header in headers:
        base += ["--header", header]
    if warmup > 0:
        await run_command(
            [*base, "--duration", f"{max(1, round(warmup))}s", url],
            time_limit=warmup + TIMEOUT_MARGIN,
        )
    text = await run_command(
        [*base, "--latency", "--duration", f"{max(1, round(seconds))}s", url],
        time_limit=seconds + TIMEOUT_MARGIN,
    )
    return parse_wrk(text)
