"""Where a load run's CPU went: each process group's CPU time per request.

budgetd, the floor, Envoy, Postgres, Redis and the load generator all share this machine's
cores, so a throughput ratio between two paths is set by what *every* process spends on a
request, not by budgetd alone. While a measurement runs, :class:`CpuMeter` reads each
group's CPU time (user + system, from ``/proc/<pid>/stat``, summed over the group's process
tree) at the start and the end of the measured window, and the machine's busy time from
``/proc/stat``; dividing by the requests answered in the window gives microseconds per
request for:

* ``server``: the budgetd or floor process tree under load;
* ``loop``: of that, the server's main thread alone: the thread that runs the asyncio event
  loop, and with it every handler, while grpcio's own threads poll and write. Both servers
  answer from one event loop, so this thread is the one that runs out first:
  ``loop_busy_pct`` is its share of one core over the window (in per cent), and near 100
  it caps the server's throughput whatever the machine's other core is doing (a server of
  more than one process, ``--workers N``, has no such figure);
* ``envoy``: the Envoy in front of it (the wrk path only);
* ``postgres``, ``redis``: the bench's own Postgres (postmaster and backends) and Redis;
* ``load``: the load generator (h2load, wrk or grpc_load): the bench's other descendants;
* ``other``: the rest of the machine's busy time (kernel threads writing Postgres' files
  back, other daemons), never below zero;
* ``total``: the machine's busy time.

Linux only (``/proc``); elsewhere every figure is None.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from bench.services import process_tree

GROUPS = ("server", "loop", "envoy", "postgres", "redis", "load", "other", "total")
# What a measurement reports beyond its groups: the loop thread's share of one core (per cent).
LOOP_BUSY = "loop_busy_pct"
COLUMNS = (*GROUPS, LOOP_BUSY)


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def process_seconds(pids: Iterable[int]) -> float:
    """CPU seconds (user + system) the processes used so far; a gone one counts 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _ticks()


def thread_seconds(pid: int) -> float:
    """CPU seconds (user + system) the main thread of process ``pid`` used so far (0 when
    the process is gone): the thread whose id is the process id."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _ticks()
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (user, nice, system, irq, softirq).

    Idle, I/O wait and steal (time the hypervisor gave to another guest) are not ours.
    """
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / _ticks()


class CpuMeter:
    """CPU time per process group across one measured window.

    ``roots`` maps a group name (``server``, ``envoy``, ``postgres``, ``redis``) to the
    process id whose tree it is, or None for a group this measurement has not got.
    ``idle`` are the trees of the bench's other servers (the one not under load): not the
    load generator, so whatever they use counts as ``other``.
    """

    def __init__(self, roots: Mapping[str, int | None], idle: Iterable[int] = ()) -> None:
        self._roots = {name: pid for name, pid in roots.items() if pid is not None}
        self._idle = list(idle)

    def snapshot(self) -> dict[str, float]:
        """Each group's CPU seconds so far, ``load`` and ``total`` included."""
        seen = {os.getpid()}
        figures: dict[str, float] = {}
        for name, root in self._roots.items():
            tree = [pid for pid in process_tree(root) if pid not in seen]
            seen.update(tree)
            figures[name] = process_seconds(tree)
            if name == "server" and tree == [root]:  # (--workers N: N loops, not measured)
                figures["loop"] = thread_seconds(root)
        for root in self._idle:
            seen.update(process_tree(root))
        # Whatever else the bench started and is still running: the load generator.
        figures["load"] = process_seconds(p for p in process_tree(os.getpid()) if p not in seen)
        figures["total"] = machine_busy_seconds()
        return figures

    async def window(self, start: float, length: float) -> tuple[dict[str, float], float]:
        """Sleep ``start`` seconds, then measure for ``length``: (CPU seconds used per
        group in the window, the window's length in seconds)."""
        await asyncio.sleep(start)
        loop = asyncio.get_running_loop()
        began, before = loop.time(), self.snapshot()
        await asyncio.sleep(length)
        after = self.snapshot()
        used = {name: after[name] - before.get(name, 0.0) for name in after}
        return used, loop.time() - began


def per_request(
    used: Mapping[str, float], requests: float, seconds: float = 0.0
) -> dict[str, float | None]:
    """Microseconds of CPU per request for every group of :data:`GROUPS`, and the loop
    thread's busy share of one core over the ``seconds`` of the window (None: the
    measurement had no such group, or answered nothing)."""
    if requests <= 0:
        return dict.fromkeys(COLUMNS)
    figures: dict[str, float | None] = {
        name: (used[name] / requests * 1e6 if name in used else None) for name in GROUPS
    }
    # The loop thread is part of the server's figure, so it is not counted twice.
    known = sum(used[name] for name in used if name not in ("total", "loop"))
    figures["other"] = max(0.0, used["total"] - known) / requests * 1e6
    loop = used.get("loop")
    figures[LOOP_BUSY] = loop / seconds * 100 if loop is not None and seconds > 0 else None
    return figures


def supported() -> bool:
    """True where ``/proc`` gives per-process and machine CPU times."""
    return Path("/proc/stat").exists() and Path(f"/proc/{os.getpid()}/stat").exists()
