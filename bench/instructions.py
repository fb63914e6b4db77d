"""``python -m bench.instructions``: CPU instructions per CheckBudget, counted by callgrind.

:mod:`bench.ab` times builds against each other, and on these shared 2-core VMs two runs of
the same code differ by a few per cent. This counts instead: each source is served under
``valgrind --tool=callgrind`` with collection off, gets ``--warmup`` CheckBudgets from h2load
(so its leases and hot entries exist and its code has run), and then collection is switched
on (``callgrind_control``) for ``--requests`` more. The count of instructions over every
thread of the server, divided by the requests, does not depend on what else the machine is
doing. It says nothing of how fast those instructions run (caches, the load generator on
the other core): the loop's CPU time under real load is :mod:`bench.ab`'s figure. Work that
depends on the clock (lease renewals, sweeps of expired holds) still varies: under valgrind
a server runs some 50 times slower, so such work is shared by fewer requests and lands in
the counted window more or less. The floor's count repeats within 0.2 %, budgetd's within
about 5 % (bench/README.md): a change worth counting this way removes more than that, or
shows in both orders of the sources.

    python -m bench.instructions floor .           # budgetd against the floor
    python -m bench.instructions main .            # this change against main

Sources are those of :mod:`bench.ab`: a git revision, a source directory, ``.`` or
``floor``. Prints, per source, instructions per request and the ratio to the first source.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.ab import FLOOR, source_server, source_trees
from bench.h2load import grpc_headers, run_command
from bench.run import CHECK_PATH, Bench, check_frame, parse_options
from bench.services import HOST, BudgetdProcess, FloorProcess, ManagedProcess, wait_serving

# Starting under valgrind takes tens of seconds (every module imported is translated).
START_LIMIT = 600.0


@dataclass(frozen=True)
class Count:
    """What one source executed: instructions over ``requests`` answered CheckBudgets."""

    name: str
    instructions: int
    requests: int

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests


def totals(dump: str) -> int:
    """The instruction count of a callgrind dump (its ``totals:`` line)."""
    found = re.search(r"^totals:\s*(\d+)", dump, re.MULTILINE)
    if found is None:
        raise ValueError("no 'totals:' line in the callgrind dump")
    return int(found.group(1))


def report(counts: list[Count]) -> str:
    """The table printed at the end: per source, instructions per request and the ratio."""
    first = counts[0]
    lines = [f"{'source':<28} {'instructions/request':>21}  vs {first.name}"]
    for count in counts:
        ratio = count.per_request / first.per_request
        lines.append(f"{count.name:<28} {count.per_request:>21,.0f}  {ratio:.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="git revision, source directory, '.' (this checkout) or 'floor'; the first is "
        "the reference",
    )  # fmt: skip
    parser.add_argument("--requests", type=int, default=3000, help="CheckBudgets counted")
    parser.add_argument("--warmup", type=int, default=3000, help="CheckBudgets before them")
    args = parser.parse_args(argv)
    if all(source == FLOOR for source in args.sources):
        parser.error("give at least one budgetd source (a revision, a directory or '.')")
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be positive and --warmup not negative")
    return args


def under_callgrind(process: ManagedProcess, out: Path) -> None:
    """Make ``process`` start under callgrind with collection off, dumping into ``out``."""
    argv = process.argv if process.argv[0] == sys.executable else [sys.executable, *process.argv]
    process.argv = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no",
        f"--callgrind-out-file={out}", *argv,
    ]  # fmt: skip


async def h2load(port: int, frame: Path, requests: int) -> None:
    """``requests`` CheckBudgets from h2load (8 connections, 2 streams each), all answered."""
    argv = ["h2load", "-n", str(requests), "-c", "8", "-m", "2", "-d", str(frame)]
    for header in grpc_headers():
        argv += ["-H", header]
    text = await run_command([*argv, f"http://{HOST}:{port}{CHECK_PATH}"], START_LIMIT)
    if f"{requests} succeeded, 0 failed, 0 errored, 0 timeout" not in text:
        raise RuntimeError(f"not every CheckBudget was answered:\n{text[-2000:]}")


async def control(*args: str) -> None:
    await run_command(["callgrind_control", *args], 60)


async def count(
    name: str,
    server: BudgetdProcess | FloorProcess,
    out: Path,
    frame: Path,
    args: argparse.Namespace,
) -> Count:
    """Warm ``server`` up, then count the instructions of ``--requests`` CheckBudgets."""
    pid = str(server.pid)
    if args.warmup:
        await h2load(server.port, frame, args.warmup)
    await control("-z", pid)
    await control("-i", "on", pid)
    await h2load(server.port, frame, args.requests)
    await control("-i", "off", pid)
    await control("-d", "measured", pid)
    dumps = sorted(out.parent.glob(f"{out.name}.*"))
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump for {name}")
    return Count(name, totals(dumps[-1].read_text()), args.requests)


async def run(args: argparse.Namespace, trees: dict[str, Path], workdir: Path) -> list[Count]:
    async with contextlib.AsyncExitStack() as stack:
        harness = Bench(parse_options([]), stack, workdir)
        database_url, redis_url = await harness.start_services()
        served: list[tuple[str, BudgetdProcess | FloorProcess, Path]] = []
        for index, source in enumerate(args.sources):
            name = f"{index}:{source}"
            server = source_server(index, source, trees, workdir, database_url, redis_url)
            out = workdir / f"callgrind-{index}.out"
            under_callgrind(server, out)
            harness.say(f"starting {name} under callgrind")
            stack.push_async_callback(server.stop)
            server.start()
            await wait_serving(server.target, server, time_limit=START_LIMIT)
            served.append((name, server, out))
        first = next(s for _, s, _ in served if isinstance(s, BudgetdProcess))
        key = await harness.issue_key(first.target)
        frame = workdir / "check.frame"
        frame.write_bytes(check_frame(key))
        counts = []
        for name, server, out in served:
            await harness.verify_allowed(server.target, key, name)
            counts.append(await count(name, server, out, frame, args))
            harness.say(f"  {name}: {counts[-1].per_request:,.0f} instructions/request")
        return counts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [
        tool for tool in ("valgrind", "callgrind_control", "h2load") if not shutil.which(tool)
    ]
    if missing:
        raise SystemExit(f"bench.instructions: not found: {', '.join(missing)} "
                         "(Debian's valgrind and nghttp2-client)")  # fmt: skip
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="budgetd-ins-")))
        trees = source_trees(args.sources, workdir, stack)
        counts = asyncio.run(run(args, trees, workdir))
    print(report(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
