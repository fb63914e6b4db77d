"""``make bench``: budgetd's decision path next to a no-op floor, in one run (issue 7).

Phases, all on 127.0.0.1 with throwaway services on free ports:

1. Postgres, Redis, ``budgetd serve`` (one process) and the floor (:mod:`bench.floor`).
   A team with a huge 30-day budget and a key issued through the admin API.
2. CheckBudget with h2load, budgetd vs the floor (interleaved, same concurrency).
3. CheckBudget and RecordSpend with :mod:`bench.grpc_load` (unique request ids), budgetd vs
   the floor; RecordSpend's target is against budgetd's own CheckBudget.
4. wrk through Envoy -> ext_authz(budgetd) vs Envoy -> ext_authz(floor).
5. ``--workers 1`` vs ``--workers 2`` with h2load (when budgetd has the flag).
6. Memory and start: BENCH_TEAMS teams and BENCH_KEYS keys COPYed into Postgres, cold starts
   to SERVING, then BENCH_DRIVE_KEYS distinct keys checked and the worker's RSS read.

It prints the table, writes ``bench/results/<UTC stamp>.json`` and ``.png`` (and
``latest.*``) and exits 0 whether or not the targets are met; non-zero only when the harness
itself fails. Every process it started is stopped on the way out, errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import grpc

import bench
from bench import cpu, report
from bench.dataset import load_dataset
from bench.envoy import EnvoyProcess
from bench.floor import KEY_ALIAS, budgetd_uses_uvloop
from bench.grpc_load import ESTIMATE, MODEL, run_grpc_load
from bench.h2load import LoadError, grpc_frame, grpc_status, run_h2load
from bench.report import Row, Scalar, at_least, at_most, ratio
from bench.services import (
    HOST,
    MASTER_KEY,
    BudgetdProcess,
    FloorProcess,
    ManagedProcess,
    PostgresServer,
    RedisServer,
    ServiceError,
    budgetd_supports_workers,
    free_port,
    rss_mb,
)
from bench.stats import Result, combine
from bench.wrk import run_wrk
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc

T = TypeVar("T")
U = TypeVar("U")
ADMIN = (("authorization", f"Bearer {MASTER_KEY}"),)
CHECK_PATH = "/budgetd.v1.BudgetAuthority/CheckBudget"
TEAM_BUDGET = 1_000_000.0

# Targets (issue 7 / DESIGN §11), as ratios measured in the same run.
CHECK_THROUGHPUT = 0.9
CHECK_P99 = 1.5
ENVOY_THROUGHPUT = 0.9
RECORD_VS_CHECK = 0.7
RSS_MB = 200.0
COLD_START_S = 2.0


@dataclass
class Options:
    """What to run; every field has a BENCH_* environment variable."""

    seconds: float
    warmup: float
    concurrency: int
    rounds: int
    teams: int
    keys: int
    drive_keys: int
    cold_starts: int
    client_processes: int
    results_dir: Path

    @property
    def time_limit(self) -> float:
        """A bound on the whole run, so a hang ends in an error rather than forever."""
        measurements = self.rounds * 10
        per_measurement = self.seconds + 2 * self.warmup + 60
        data = self.keys / 2_000 + self.drive_keys / 50
        return measurements * per_measurement + data + 600


def parse_options(argv: list[str] | None) -> Options:
    """Command-line flags, defaulting to BENCH_* variables, defaulting to the full bench."""
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=float(env.get("BENCH_SECONDS", 10)))
    parser.add_argument("--warmup", type=float, default=float(env.get("BENCH_WARMUP", 3)))
    parser.add_argument(
        "--concurrency", type=int, default=int(env.get("BENCH_CONCURRENCY", 16)),
        help="requests in flight, the same for budgetd and the floor",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=int(env.get("BENCH_ROUNDS", 3)))
    parser.add_argument("--teams", type=int, default=int(env.get("BENCH_TEAMS", 100_000)))
    parser.add_argument("--keys", type=int, default=int(env.get("BENCH_KEYS", 1_000_000)))
    parser.add_argument(
        "--drive-keys", type=int, default=int(env.get("BENCH_DRIVE_KEYS", 0)),
        help="distinct keys checked before RSS is read (default: 5%% of --keys, at most 50,000)",
    )  # fmt: skip
    parser.add_argument("--cold-starts", type=int, default=int(env.get("BENCH_COLD_STARTS", 3)))
    parser.add_argument(
        "--client-processes", type=int, default=int(env.get("BENCH_CLIENT_PROCESSES", 1)),
        help="grpc_load client processes",
    )  # fmt: skip
    results = Path(env.get("BENCH_RESULTS", bench.ROOT / "bench" / "results"))
    parser.add_argument("--results-dir", type=Path, default=results)
    args = parser.parse_args(argv)
    options = Options(**vars(args))
    if options.drive_keys <= 0:
        options.drive_keys = min(50_000, max(1, options.keys // 20))
    options.drive_keys = min(options.drive_keys, options.keys)
    if options.seconds <= 0 or options.rounds < 1 or options.concurrency < 1:
        parser.error("--seconds, --rounds and --concurrency must be positive")
    if options.teams < 1 or options.keys < 1 or options.cold_starts < 1:
        parser.error("--teams, --keys and --cold-starts must be at least 1")
    return options


def check_frame(key: str) -> bytes:
    """The gRPC frame h2load posts: the bench's CheckBudget for ``key`` (an allow)."""
    return grpc_frame(pb.CheckBudgetRequest(api_key=key, model=MODEL, estimated_cost=ESTIMATE))


class Bench:
    """One run: the services it started, the figures it collected."""

    def __init__(self, options: Options, stack: contextlib.AsyncExitStack, workdir: Path) -> None:
        self.o = options
        self.stack = stack
        self.workdir = workdir
        self.raw: dict[str, dict[str, list[Result]]] = {}
        # CPU microseconds per request of each process group (bench.cpu), per round.
        self.cpu: dict[str, dict[str, list[dict[str, float | None]]]] = {}
        self.pids: dict[str, int | None] = {}
        self.launched: list[ManagedProcess] = []
        self.extra: dict[str, Any] = {}
        self.warnings: list[str] = []

    def say(self, message: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    async def launch(self, process: ManagedProcess, start: Callable[[], Awaitable[Any]]) -> Any:
        """Start a process that is stopped when the run ends, however it ends."""
        self.stack.push_async_callback(process.stop)
        self.launched.append(process)
        return await start()

    def result(self, name: str, who: str) -> Result:
        """The rounds of measurement ``name`` against ``who``, combined."""
        return combine(self.raw[name][who])

    def add(self, name: str, who: str, result: Result) -> None:
        self.raw.setdefault(name, {}).setdefault(who, []).append(result)
        self.say(
            f"  {name} {who}: {result.rps:.0f} req/s, p50 {result.p50_ms:.2f} ms, "
            f"p99 {result.p99_ms:.2f} ms, {result.failed} failed"
        )

    # -- phase 1 ---------------------------------------------------------------------------

    async def start_services(self) -> tuple[str, str]:
        """Postgres and Redis; a fresh database. Returns (database URL, redis URL)."""
        self.say("starting Postgres and Redis")
        pg, redis = PostgresServer(), RedisServer()
        self.stack.push_async_callback(pg.stop)
        self.stack.push_async_callback(redis.stop)
        await asyncio.gather(pg.start(), redis.start())
        self.pids = {"postgres": pg.pid, "redis": redis.pid}
        database_url = await pg.create_database("budgetd_bench")
        return database_url, redis.url

    async def issue_key(self, target: str) -> str:
        """A team with a huge budget and one key for it, through the admin API."""
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BudgetAuthorityStub(channel)
            team = await stub.CreateTeam(
                pb.CreateTeamRequest(
                    team_alias="bench", max_budget=TEAM_BUDGET, budget_duration="30d"
                ),
                metadata=ADMIN,
                timeout=30,
            )
            issued = await stub.IssueKey(
                pb.IssueKeyRequest(team_id=team.team_id, key_alias=KEY_ALIAS),
                metadata=ADMIN,
                timeout=30,
            )
            self.extra["team_id"] = team.team_id
            return issued.key

    async def verify_allowed(self, target: str, key: str, who: str) -> None:
        """One CheckBudget by hand: the key must be allowed, or the bench measures denials."""
        async with grpc.aio.insecure_channel(target) as channel:
            answer = await pb_grpc.BudgetAuthorityStub(channel).CheckBudget(
                pb.CheckBudgetRequest(api_key=key, model=MODEL, estimated_cost=ESTIMATE),
                timeout=30,
            )
        if not answer.allowed:
            raise ServiceError(f"{who} denied the bench key: {answer.reason} {answer.message}")

    # -- phase 2 to 4 ----------------------------------------------------------------------

    async def metered(
        self, name: str, who: str, servers: dict[str, int], run: Awaitable[Result]
    ) -> None:
        """Run one measurement while :class:`bench.cpu.CpuMeter` reads where its CPU went
        (``servers``: the server's and Envoy's process ids), then record both."""
        if not cpu.supported():
            self.add(name, who, await run)
            return
        idle = [p.pid for p in self.launched if p.alive and p.pid not in servers.values()]
        meter = cpu.CpuMeter({**servers, **self.pids}, idle)
        # A margin at each end keeps the window inside the tool's measured period.
        margin = min(0.5, self.o.seconds / 10)
        window = asyncio.create_task(
            meter.window(self.o.warmup + margin, self.o.seconds - 2 * margin)
        )
        try:
            result = await run
        except BaseException:
            window.cancel()
            raise
        if window.done():
            used, length = window.result()
            per_request = cpu.per_request(used, result.rps * length, length)
        else:  # the tool ended early (it failed): no window to report
            window.cancel()
            per_request = cpu.per_request({}, 0)
        self.cpu.setdefault(name, {}).setdefault(who, []).append(per_request)
        self.add(name, who, result)

    async def h2load(self, name: str, who: str, port: int, frame: Path, pid: int) -> None:
        clients = min(8, self.o.concurrency)
        run = run_h2load(
            f"http://{HOST}:{port}{CHECK_PATH}",
            frame,
            clients=clients,
            streams=max(1, self.o.concurrency // clients),
            seconds=self.o.seconds,
            warmup=self.o.warmup,
            log_file=self.workdir / f"h2load-{who}.log",
        )
        await self.metered(name, who, {"server": pid}, run)

    async def grpc_load(self, rpc: str, who: str, target: str, keys_file: Path, pid: int) -> None:
        run = run_grpc_load(
            target,
            rpc,
            keys_file,
            self.workdir,
            processes=self.o.client_processes,
            concurrency=self.o.concurrency,
            seconds=self.o.seconds,
            warmup=self.o.warmup,
        )
        await self.metered(f"grpc_load_{rpc}", who, {"server": pid}, run)

    async def envoy(self, who: str, envoy: EnvoyProcess, key: str, pid: int) -> None:
        run = run_wrk(
            envoy.url,
            [f"authorization: Bearer {key}"],
            connections=self.o.concurrency,
            seconds=self.o.seconds,
            warmup=self.o.warmup,
        )
        await self.metered("wrk_envoy", who, {"server": pid, "envoy": envoy.pid}, run)

    async def measure_main(self, budgetd: BudgetdProcess, floor: FloorProcess, key: str) -> None:
        """h2load, grpc_load and wrk, floor and budgetd alternating."""
        frame = self.workdir / "check.frame"
        frame.write_bytes(check_frame(key))
        for who, port in (("floor", floor.port), ("budgetd", budgetd.port)):
            status = await grpc_status(f"http://{HOST}:{port}{CHECK_PATH}", frame)
            if status != 0:
                raise LoadError(f"{who} answered the h2load frame with grpc-status {status}")
        keys_file = self.workdir / "bench-key.txt"
        keys_file.write_text(key + "\n")
        pairs: tuple[tuple[str, FloorProcess | BudgetdProcess], ...] = (
            ("floor", floor),
            ("budgetd", budgetd),
        )
        for round_no in range(1, self.o.rounds + 1):
            self.say(f"round {round_no}/{self.o.rounds}: CheckBudget with h2load")
            for who, server in alternating(pairs, round_no):
                await self.h2load("h2load_check", who, server.port, frame, server.pid)
            self.say(f"round {round_no}/{self.o.rounds}: CheckBudget and RecordSpend, grpc_load")
            for rpc in ("check", "record"):
                for who, server in alternating(pairs, round_no):
                    # budgetd's RecordSpends: how many rows and calls its round trips carried.
                    metrics = server.metrics_port if isinstance(server, BudgetdProcess) else 0
                    before = await scrape(metrics) if rpc == "record" and metrics else None
                    await self.grpc_load(rpc, who, server.target, keys_file, server.pid)
                    if before is not None:
                        counted = batching(before, await scrape(metrics))
                        self.extra.setdefault("batching", []).append(counted)
        self.say("starting two Envoys (ext_authz -> floor, ext_authz -> budgetd)")
        envoys = {}
        for who, server in pairs:
            envoy = EnvoyProcess(f"envoy-{who}", self.workdir, server.port)
            await self.launch(envoy, envoy.start_serving)
            envoys[who] = envoy
        for round_no in range(1, self.o.rounds + 1):
            self.say(f"round {round_no}/{self.o.rounds}: wrk through Envoy")
            for who, server in alternating(pairs, round_no):
                await self.envoy(who, envoys[who], key, server.pid)
        for envoy in envoys.values():
            await envoy.stop()

    async def verify_after(self, budgetd: BudgetdProcess, before: dict[str, float]) -> None:
        """budgetd's own counters: every check of the load allowed, no backend errors."""
        after = await scrape(budgetd.metrics_port)
        delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
        async with grpc.aio.insecure_channel(budgetd.target) as channel:
            team = await pb_grpc.BudgetAuthorityStub(channel).GetTeam(
                pb.GetTeamRequest(team_id=self.extra["team_id"]), metadata=ADMIN, timeout=30
            )
        measured_records = sum(each.ok for each in self.raw["grpc_load_record"]["budgetd"])
        check = {
            "decisions_allowed": delta.get("allowed", 0.0),
            "decisions_denied": delta.get("denied", 0.0),
            "backend_errors": delta.get("backend_errors", 0.0),
            "spends_recorded": delta.get("recorded", 0.0),
            "spends_duplicate": delta.get("duplicate", 0.0),
            "team_spend_usd": team.spend,
            "measured_record_spends": measured_records,
        }
        self.extra["verification"] = check
        if check["decisions_denied"] or check["backend_errors"] or check["spends_duplicate"]:
            self.warnings.append(f"budgetd denied or failed calls under load: {check}")
        if team.spend + 1e-12 < measured_records * 1e-9:
            self.warnings.append(
                f"team spend {team.spend} is below the {measured_records} acknowledged spends"
            )

    # -- phase 5 ---------------------------------------------------------------------------

    async def measure_workers(self, database_url: str, redis_url: str) -> None:
        """CheckBudget with h2load against ``--workers 1`` and ``--workers 2``."""
        if not await asyncio.to_thread(budgetd_supports_workers):
            self.say("budgetd serve has no --workers flag: scale-out not available")
            self.extra["workers_available"] = False
            return
        self.extra["workers_available"] = True
        servers = {}
        for workers in (1, 2):
            server = BudgetdProcess(
                f"budgetd-workers-{workers}", self.workdir, database_url, redis_url,
                workers=workers,
            )  # fmt: skip
            await self.launch(server, server.start_serving)
            servers[workers] = server
        key = await self.issue_key(servers[1].target)
        await self.verify_allowed(servers[2].target, key, "budgetd --workers 2")
        frame = self.workdir / "check-workers.frame"
        frame.write_bytes(check_frame(key))
        for round_no in range(1, self.o.rounds + 1):
            self.say(f"round {round_no}/{self.o.rounds}: --workers 1 vs 2 with h2load")
            for workers, server in alternating(tuple(servers.items()), round_no):
                await self.h2load(
                    "h2load_workers", f"workers_{workers}", server.port, frame, server.pid
                )
        for server in servers.values():
            await server.stop()

    # -- phase 6 ---------------------------------------------------------------------------

    async def measure_memory(self, database_url: str, redis_url: str) -> None:
        """Load the dataset, time cold starts, drive distinct keys, read RSS."""
        o = self.o
        self.say(f"loading {o.teams} teams and {o.keys} keys into Postgres (COPY)")
        data = await load_dataset(database_url, teams=o.teams, keys=o.keys, driven=o.drive_keys)
        self.say(f"  loaded in {data.seconds:.1f} s")
        starts: list[float] = []
        server: BudgetdProcess | None = None
        for attempt in range(o.cold_starts):
            server = BudgetdProcess(
                f"budgetd-cold-{attempt}", self.workdir, database_url, redis_url
            )
            starts.append(await self.launch(server, server.start_serving))
            self.say(f"  cold start {attempt + 1}: {starts[-1]:.2f} s to SERVING")
            if attempt < o.cold_starts - 1:
                await server.stop()
        assert server is not None
        idle = rss_mb(server.pid)
        keys_file = self.workdir / "driven-keys.txt"
        keys_file.write_text("\n".join(data.plaintexts) + "\n")
        self.say(f"checking {len(data.plaintexts)} distinct keys")
        sweep = await run_grpc_load(
            server.target, "check", keys_file, self.workdir,
            processes=o.client_processes, concurrency=o.concurrency, seconds=0, warmup=0,
            sweep=True, time_limit=max(120.0, len(data.plaintexts) / 20),
        )  # fmt: skip
        self.say(f"  {sweep.rps:.0f} checks/s over distinct keys, {sweep.failed} failed")
        if sweep.failed:
            self.warnings.append(f"{sweep.failed} checks of distinct keys failed: {sweep.notes}")
        self.extra["memory"] = {
            "teams": data.teams,
            "keys": data.keys,
            "distinct_keys_checked": len(data.plaintexts),
            "dataset_load_s": data.seconds,
            "rss_idle_mb": idle,
            "rss_mb": rss_mb(server.pid),
            "rss_hwm_mb": rss_mb(server.pid, "VmHWM"),
            "cold_start_samples_s": starts,
            "cold_start_s": statistics.median(starts),
            "distinct_key_checks": sweep,
        }
        await server.stop()

    # -- the whole run ---------------------------------------------------------------------

    async def run(self) -> None:
        database_url, redis_url = await self.start_services()
        budgetd = BudgetdProcess(
            "budgetd", self.workdir, database_url, redis_url, metrics_port=free_port()
        )
        floor = FloorProcess(self.workdir)
        self.say("starting budgetd and the floor")
        await self.launch(budgetd, budgetd.start_serving)
        await self.launch(floor, floor.start_serving)
        key = await self.issue_key(budgetd.target)
        await self.verify_allowed(budgetd.target, key, "budgetd")
        await self.verify_allowed(floor.target, key, "the floor")
        before = await scrape(budgetd.metrics_port)
        await self.measure_main(budgetd, floor, key)
        await self.verify_after(budgetd, before)
        await budgetd.stop()
        await floor.stop()
        await self.measure_workers(database_url, redis_url)
        await self.measure_memory(database_url, redis_url)


def alternating(pairs: tuple[tuple[T, U], ...], round_no: int) -> tuple[tuple[T, U], ...]:
    """Reference first in odd rounds, subject first in even ones (A B B A ...), so that a
    drift in the machine's speed over the run does not favour either (with more than two:
    A B C, then C B A)."""
    return pairs if round_no % 2 else pairs[::-1]


# budgetd's batching counters (server.metrics.BatchingCollector, unlabelled), by short name.
BATCHING_COUNTERS = {
    short: f"budgetd_{short}_total"
    for short in (
        "ledger_group_commits",
        "ledger_group_commit_rows",
        "redis_script_round_trips",
        "redis_script_calls",
    )
}


def batching(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """What the ledger's group commits and the Redis pipelines carried between two scrapes:
    the counts, rows per commit and script calls per round trip (None where nothing went)."""
    grew = {
        short: after.get(name, 0.0) - before.get(name, 0.0)
        for short, name in BATCHING_COUNTERS.items()
    }
    commits, rows = grew["ledger_group_commits"], grew["ledger_group_commit_rows"]
    trips, calls = grew["redis_script_round_trips"], grew["redis_script_calls"]
    return {
        **grew,
        "rows_per_commit": rows / commits if commits else None,
        "calls_per_round_trip": calls / trips if trips else None,
    }


def batching_summary(rounds: list[dict[str, float | None]]) -> dict[str, Any]:
    """The rounds' batching figures (:func:`batching`): medians of the two ratios, and each
    round."""

    def median(key: str) -> float | None:
        values = [value for each in rounds if (value := each[key]) is not None]
        return statistics.median(values) if values else None

    return {
        "rows_per_commit": median("rows_per_commit"),
        "calls_per_round_trip": median("calls_per_round_trip"),
        "per_round": rounds,
    }


async def scrape(port: int) -> dict[str, float]:
    """budgetd's decision, spend, backend-error and batching counters from its /metrics."""
    url = f"http://{HOST}:{port}/metrics"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(url) as response,
    ):
        text = await response.text()
    return counters_of(text)


def counters_of(exposition: str) -> dict[str, float]:
    """The counters :func:`scrape` reads, from a /metrics text: decisions by outcome, spends
    by result, backend errors, and the batching counters by name."""
    totals: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith("budgetd_decisions_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            totals[outcome] = totals.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("budgetd_spend_records_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            totals[result] = totals.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("budgetd_backend_errors_total{"):
            totals["backend_errors"] = totals.get("backend_errors", 0.0) + float(
                line.rsplit(" ", 1)[1]
            )
        elif (name := line.partition(" ")[0]) in BATCHING_COUNTERS.values():
            totals[name] = float(line.rsplit(" ", 1)[1])
    return totals


def build_rows(b: Bench) -> tuple[list[Row], list[Scalar], dict[str, Any]]:
    """The table's rows, its memory/start lines and the headline ratios."""
    check, check_floor = b.result("h2load_check", "budgetd"), b.result("h2load_check", "floor")
    envoy, envoy_floor = b.result("wrk_envoy", "budgetd"), b.result("wrk_envoy", "floor")
    g_check, g_check_floor = (b.result("grpc_load_check", w) for w in ("budgetd", "floor"))
    record, record_floor = (b.result("grpc_load_record", w) for w in ("budgetd", "floor"))
    ratios = {
        "check_vs_floor_throughput": ratio(check.rps, check_floor.rps),
        "check_vs_floor_p99": ratio(check.p99_ms, check_floor.p99_ms),
        "envoy_vs_floor_throughput": ratio(envoy.rps, envoy_floor.rps),
        "record_vs_check_throughput": ratio(record.rps, g_check.rps),
        "check_vs_floor_throughput_grpc_load": ratio(g_check.rps, g_check_floor.rps),
        "record_vs_floor_throughput": ratio(record.rps, record_floor.rps),
    }

    def rounds(subject: tuple[str, str], reference: tuple[str, str], field: str = "rps") -> Any:
        figures = [
            [getattr(r, field) for r in b.raw[name][who]] for name, who in (subject, reference)
        ]
        return report.paired_ratios(*figures)

    rows = [
        Row("CheckBudget (h2load)", check, check_floor, ratios["check_vs_floor_throughput"],
            f">= {CHECK_THROUGHPUT:.2f}x floor req/s",
            at_least(ratios["check_vs_floor_throughput"], CHECK_THROUGHPUT),
            "check_vs_floor_throughput",
            rounds=rounds(("h2load_check", "budgetd"), ("h2load_check", "floor"))),
        Row("CheckBudget p99 (h2load)", check, check_floor, ratios["check_vs_floor_p99"],
            f"<= {CHECK_P99:.2f}x floor p99", at_most(ratios["check_vs_floor_p99"], CHECK_P99),
            "check_vs_floor_p99", plot=False,
            rounds=rounds(("h2load_check", "budgetd"), ("h2load_check", "floor"), "p99_ms")),
        Row("Envoy ext_authz (wrk)", envoy, envoy_floor, ratios["envoy_vs_floor_throughput"],
            f">= {ENVOY_THROUGHPUT:.2f}x floor req/s",
            at_least(ratios["envoy_vs_floor_throughput"], ENVOY_THROUGHPUT),
            "envoy_vs_floor_throughput",
            rounds=rounds(("wrk_envoy", "budgetd"), ("wrk_envoy", "floor"))),
        Row("CheckBudget (grpc_load)", g_check, g_check_floor,
            ratios["check_vs_floor_throughput_grpc_load"], "(for reference)", None,
            "check_vs_floor_throughput_grpc_load",
            rounds=rounds(("grpc_load_check", "budgetd"), ("grpc_load_check", "floor"))),
        Row("RecordSpend (grpc_load) / check", record, record_floor,
            ratios["record_vs_check_throughput"], f">= {RECORD_VS_CHECK:.2f}x CheckBudget",
            at_least(ratios["record_vs_check_throughput"], RECORD_VS_CHECK),
            "record_vs_check_throughput",
            rounds=rounds(("grpc_load_record", "budgetd"), ("grpc_load_check", "budgetd"))),
    ]  # fmt: skip
    if b.extra.get("workers_available"):
        w1, w2 = (b.result("h2load_workers", f"workers_{n}") for n in (1, 2))
        ratios["workers_2_vs_1_throughput"] = ratio(w2.rps, w1.rps)
        rows.append(
            Row("CheckBudget --workers 2 (ref: 1)", w2, w1, ratios["workers_2_vs_1_throughput"],
                "(reported)", None, "workers_2_vs_1_throughput", plot=False,
                rounds=rounds(("h2load_workers", "workers_2"), ("h2load_workers", "workers_1")))
        )  # fmt: skip
    else:
        ratios["workers_2_vs_1_throughput"] = None
        rows.append(
            Row("CheckBudget --workers 2", None, None, None, "n/a: no --workers", None, plot=False)
        )
    memory = b.extra["memory"]
    scalars = [
        Scalar(
            f"RSS, 1 worker ({memory['teams']} teams, {memory['keys']} keys)",
            memory["rss_mb"], "MB", f"< {RSS_MB:.0f} MB", memory["rss_mb"] < RSS_MB,
            f"{memory['distinct_keys_checked']} distinct keys checked; idle "
            f"{memory['rss_idle_mb']:.1f} MB, peak {memory['rss_hwm_mb']:.1f} MB",
        ),
        Scalar(
            "cold start to SERVING (median)", memory["cold_start_s"], "s",
            f"< {COLD_START_S:.0f} s", memory["cold_start_s"] < COLD_START_S,
            "samples: " + ", ".join(f"{s:.2f} s" for s in memory["cold_start_samples_s"]),
        ),
    ]  # fmt: skip
    return rows, scalars, ratios


def build_report(
    b: Bench, rows: list[Row], scalars: list[Scalar], ratios: dict[str, Any], stamp: str,
    seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """The JSON document of the run."""
    memory = b.extra["memory"]
    targets = {
        row.key: {
            "value": row.ratio,
            "target": row.target,
            "pass": row.passed,
            "per_round": list(row.rounds),
        }
        for row in rows
        if row.key and row.passed is not None
    }
    targets["rss_mb"] = {"value": memory["rss_mb"], "target": scalars[0].target,
                         "pass": scalars[0].passed}  # fmt: skip
    targets["cold_start_s"] = {"value": memory["cold_start_s"], "target": scalars[1].target,
                               "pass": scalars[1].passed}  # fmt: skip
    workers: dict[str, Any] = {"available": b.extra.get("workers_available", False)}
    if workers["available"]:
        workers |= {"1": b.result("h2load_workers", "workers_1"),
                    "2": b.result("h2load_workers", "workers_2")}  # fmt: skip
    document: dict[str, Any] = report.clean_floats(
        json.loads(
            json.dumps(
                {
                    "timestamp": stamp,
                    "duration_s": seconds,
                    **ratios,
                    "rss_mb": memory["rss_mb"],
                    "cold_start_s": memory["cold_start_s"],
                    "all_targets_met": all(t["pass"] for t in targets.values()),
                    "targets": targets,
                    "workers": workers,
                    "memory": memory,
                    "results": {
                        name: {who: combine(rounds) for who, rounds in by_who.items()}
                        for name, by_who in b.raw.items()
                    },
                    "rounds": b.raw,
                    # Where each measurement's CPU went (bench/cpu.py): microseconds per
                    # request per process group, the median over rounds, then each round.
                    "cpu_us_per_request": report.cpu_medians(b.cpu),
                    "cpu_rounds": b.cpu,
                    # Under budgetd's RecordSpend load: ledger rows per group commit and
                    # Redis script calls per round trip, the median over rounds, then each.
                    "batching": batching_summary(b.extra.get("batching", [])),
                    "verification": b.extra.get("verification"),
                    "warnings": b.warnings,
                    "config": {
                        **asdict(b.o),
                        "results_dir": str(b.o.results_dir),
                        "event_loop": "uvloop" if budgetd_uses_uvloop() else "asyncio",
                    },
                    "machine": report.machine(),
                },
                default=_plain,
                allow_nan=True,
            )
        )
    )
    return document


def _plain(value: object) -> object:
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


async def main_async(options: Options) -> int:
    """Run the bench within its time limit; print and write the report."""
    began = time.perf_counter()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    workdir = Path(tempfile.mkdtemp(prefix="budgetd-bench-"))
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        async with contextlib.AsyncExitStack() as stack:
            b = Bench(options, stack, workdir)
            async with asyncio.timeout(options.time_limit):
                await b.run()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    seconds = time.perf_counter() - began
    rows, scalars, ratios = build_rows(b)
    document = build_report(b, rows, scalars, ratios, stamp, seconds)
    path = report.write(options.results_dir, stamp, document, rows)
    print(report.table(rows, scalars))
    cpu_lines = report.cpu_table(report.cpu_medians(b.cpu), cpu.COLUMNS)
    if cpu_lines:
        print(cpu_lines)
    grouped = document["batching"]
    if grouped["rows_per_commit"] is not None:
        print(
            f"RecordSpend load, budgetd: {grouped['rows_per_commit']:.1f} ledger rows per group"
            f" commit, {grouped['calls_per_round_trip'] or 0:.1f} Redis script calls per round"
            " trip (medians of the rounds)"
        )
    for warning in b.warnings:
        print(f"warning: {warning}")
    met = "every target met" if document["all_targets_met"] else "some targets missed"
    print(f"{met}; {path} (and .png), {seconds:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 when the bench ran (targets met or not), 1 when the harness failed."""
    options = parse_options(argv)
    try:
        return asyncio.run(main_async(options))
    except (ServiceError, LoadError, OSError, grpc.aio.AioRpcError, TimeoutError) as exc:
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
