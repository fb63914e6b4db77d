"""``python -m bench.ab``: budgetd builds against each other, in interleaved rounds.

``make bench`` says how far budgetd is from the floor; this says whether a change moved it.
Each source is served as a ``budgetd serve`` of its own against one throwaway Postgres and
Redis, all with the same key, and each round drives every one of them with the same load
(``--path``: CheckBudget with h2load, wrk through an Envoy in front of each, or durable
RecordSpends with unique request ids from :mod:`bench.grpc_load`) in alternating order
(A B C, then C B A, ...), so that a slow minute of this shared machine hits all of them.
A source is a git revision (checked out in a throwaway worktree), a directory holding
budgetd's source tree, ``.`` for this checkout as it is (uncommitted changes included), or
``floor`` for the no-op floor (:mod:`bench.floor`). Every source runs on this checkout's
virtualenv, its ``server`` package taken from the source's tree.

    python -m bench.ab main .                  # this change against main
    python -m bench.ab --path envoy floor .    # through Envoy's ext_authz, vs the floor
    python -m bench.ab --path record main .    # durable RecordSpends

It prints each round's figures and, per source, the median of its per-round ratios to the
first source's: two processes of the same code differ by a few per cent here, so a change
worth keeping moves that median by more, in most rounds. The loop column is the CPU time
of the server's event-loop thread per answered request (``/proc``), over the measured part.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench.envoy import EnvoyProcess
from bench.run import Bench, alternating, check_frame, parse_options
from bench.services import BudgetdProcess, FloorProcess
from bench.stats import Result

FLOOR = "floor"
# Each path's measurement, by its name in Bench (and in bench/run.py's JSON).
MEASUREMENTS = {"check": "h2load_check", "envoy": "wrk_envoy", "record": "grpc_load_record"}
PATHS = tuple(MEASUREMENTS)


@dataclass
class Served:
    """One source, running: its server and, for the Envoy path, the Envoy in front of it."""

    name: str
    server: BudgetdProcess | FloorProcess
    envoy: EnvoyProcess | None = None
    results: list[Result] = field(default_factory=list)
    loop_us: list[float | None] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """A source's figures over the rounds, next to the reference (the first source)."""

    name: str
    median_rps: float
    median_loop_us: float | None
    ratios: tuple[float, ...]  # its req/s over the reference's, round by round

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def faster_rounds(self) -> int:
        return sum(ratio > 1 for ratio in self.ratios)


def summarise(served: Sequence[Served]) -> list[Summary]:
    """Each source against the first, by the ratio of their req/s within each round."""
    reference = [result.rps for result in served[0].results]
    summaries = []
    for each in served:
        rps = [result.rps for result in each.results]
        ratios = tuple(
            mine / theirs if theirs > 0 else 0.0
            for mine, theirs in zip(rps, reference, strict=True)
        )
        loops = [value for value in each.loop_us if value is not None]
        summaries.append(
            Summary(
                name=each.name,
                median_rps=statistics.median(rps),
                median_loop_us=statistics.median(loops) if loops else None,
                ratios=ratios,
            )
        )
    return summaries


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument(
        "sources", nargs="+", metavar="SOURCE",
        help="git revision, source directory, '.' (this checkout) or 'floor'; the first is "
        "the reference",
    )  # fmt: skip
    parser.add_argument("--path", choices=PATHS, default="check")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if len(args.sources) < 2:
        parser.error("give at least two sources: a reference and one to compare with it")
    if all(source == FLOOR for source in args.sources):
        parser.error("give at least one budgetd source (a revision, a directory or '.')")
    if args.rounds < 1 or args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")
    return args


def source_tree(source: str, worktrees: Path, stack: contextlib.ExitStack) -> Path:
    """The directory whose ``server`` package ``source`` names (see the module docstring)."""
    if source == ".":
        return bench.ROOT
    directory = Path(source)
    if (directory / "server" / "cli.py").is_file():
        return directory.resolve()
    tree = worktrees / f"tree-{len(list(worktrees.iterdir()))}"
    git = ["git", "-C", str(bench.ROOT)]
    done = subprocess.run(
        [*git, "worktree", "add", "--quiet", "--detach", str(tree), source],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench.ab: {source!r} is neither a directory nor a git revision:\n"
                         f"{done.stderr.strip()}")  # fmt: skip
    stack.callback(
        subprocess.run, [*git, "worktree", "remove", "--force", str(tree)],
        capture_output=True, check=False,
    )  # fmt: skip
    return tree


def source_trees(
    sources: Sequence[str], workdir: Path, stack: contextlib.ExitStack
) -> dict[str, Path]:
    """The tree of each budgetd source (worktrees under ``workdir``, removed with ``stack``)."""
    worktrees = workdir / "trees"
    worktrees.mkdir()
    return {
        source: source_tree(source, worktrees, stack)
        for source in dict.fromkeys(sources)
        if source != FLOOR
    }


def source_server(
    index: int,
    source: str,
    trees: dict[str, Path],
    workdir: Path,
    database_url: str,
    redis_url: str,
) -> BudgetdProcess | FloorProcess:
    """The (not yet started) server of the ``index``-th source: the floor, or a ``budgetd
    serve`` whose ``server`` package comes from the source's tree."""
    if source == FLOOR:
        return FloorProcess(workdir)
    server = BudgetdProcess(f"budgetd-{index}", workdir, database_url, redis_url)
    assert server.env is not None
    server.env["PYTHONPATH"] = str(trees[source])
    return server


async def measure(
    harness: Bench, path: str, each: Served, key: str, frame: Path, keys_file: Path
) -> None:
    """One load run against one source, through the bench's own runners (which also read
    where the CPU went); its result and loop CPU per request go to ``each``."""
    server = each.server
    if path == "record":
        await harness.grpc_load("record", each.name, server.target, keys_file, server.pid)
    elif path == "envoy":
        assert each.envoy is not None
        await harness.envoy(each.name, each.envoy, key, server.pid)
    else:
        await harness.h2load(MEASUREMENTS[path], each.name, server.port, frame, server.pid)
    name = MEASUREMENTS[path]
    each.results.append(harness.raw[name][each.name][-1])
    cpu_rounds = harness.cpu.get(name, {}).get(each.name)
    each.loop_us.append(cpu_rounds[-1].get("loop") if cpu_rounds else None)


async def run(args: argparse.Namespace, trees: dict[str, Path], workdir: Path) -> list[Served]:
    async with contextlib.AsyncExitStack() as stack:
        options = parse_options(
            ["--seconds", str(args.seconds), "--warmup", str(args.warmup),
             "--concurrency", str(args.concurrency)]
        )  # fmt: skip
        harness = Bench(options, stack, workdir)
        database_url, redis_url = await harness.start_services()
        served: list[Served] = []
        for index, source in enumerate(args.sources):
            name = f"{index}:{source}"
            server = source_server(index, source, trees, workdir, database_url, redis_url)
            harness.say(f"starting {name}")
            await harness.launch(server, server.start_serving)
            served.append(Served(name, server))
        first = next(each.server for each in served if isinstance(each.server, BudgetdProcess))
        key = await harness.issue_key(first.target)
        for each in served:
            await harness.verify_allowed(each.server.target, key, each.name)
            if args.path == "envoy":
                envoy = EnvoyProcess(f"envoy-{len(harness.launched)}", workdir, each.server.port)
                await harness.launch(envoy, envoy.start_serving)
                each.envoy = envoy
        keys_file = workdir / "key.txt"
        keys_file.write_text(key + "\n")
        frame = workdir / "check.frame"
        frame.write_bytes(check_frame(key))
        for round_no in range(1, args.rounds + 1):
            harness.say(f"round {round_no}/{args.rounds}")
            for _, each in alternating(tuple((each.name, each) for each in served), round_no):
                await measure(harness, args.path, each, key, frame, keys_file)
                loop = each.loop_us[-1]
                if loop is not None:
                    harness.say(f"  {each.name}: loop {loop:.0f} µs/request")
        return served


def report(summaries: Sequence[Summary]) -> str:
    """The table printed at the end."""
    reference = summaries[0].name
    lines = [f"{'source':<28} {'req/s':>8} {'loop µs':>8}  vs {reference}, per round"]
    for each in summaries:
        loop = f"{each.median_loop_us:.0f}" if each.median_loop_us is not None else "-"
        rounds = " ".join(f"{ratio:.3f}" for ratio in each.ratios)
        lines.append(
            f"{each.name:<28} {each.median_rps:>8.0f} {loop:>8}  {each.median_ratio:.3f} "
            f"({each.faster_rounds}/{len(each.ratios)} faster: {rounds})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="budgetd-ab-")))
        trees = source_trees(args.sources, workdir, stack)
        served = asyncio.run(run(args, trees, workdir))
    print(report(summarise(served)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
