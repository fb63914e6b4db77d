"""Load that keeps running through a fault, and the invariants checked after it.

:func:`run_load` drives CheckBudget -> RecordSpend cycles against real replicas until told to
stop, with a short client deadline, and records every answer with its code and latency, so a
test can assert what the replicas answered *during* a fault (kept deciding, or failed closed)
and hold the ledger and the counters to what they acknowledged *after* it:

* :func:`assert_every_ok_in_ledger`: every RecordSpend answered OK is in the ledger exactly
  once with its cost; any other row is one whose RecordSpend was sent but not answered OK
  (the answer was lost, the spend was not: that is allowed, never the reverse);
* :func:`assert_counters_match_ledger`: after the holds of unanswered requests expired, the
  Redis counters of the team and its key equal the ledger's exact sums, nothing held.

Costs are whole micro-USD, exact on the wire (see tests/replicas.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from harness import ADMIN
from replicas import NANOS_PER_MICRO, Replica, ledger_rows, redis_counters
from server.gen.budgetd.v1 import budgetd_pb2 as pb

DEADLINE = 3.0
"""The client deadline of every RPC the load sends: every answer must come within it."""
T = TypeVar("T")
_BACKOFF = 0.02  # after an error, so a replica answering UNAVAILABLE at once is not spun on


@dataclass
class FaultLoad:
    """Everything the replicas answered (amounts in nano-USD, times from time.monotonic)."""

    checks: Counter[str] = field(default_factory=Counter)  # allowed | denied | <code name>
    records: Counter[str] = field(default_factory=Counter)  # ok | duplicate | <code name>
    recorded: dict[str, int] = field(default_factory=dict)  # answered OK: request_id -> cost
    attempted: dict[str, int] = field(default_factory=dict)  # every RecordSpend sent
    errors: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rpc, code: text)
    allowed_at: list[float] = field(default_factory=list)
    recorded_at: list[float] = field(default_factory=list)  # RecordSpend answered OK
    slowest: float = 0.0

    def allowed_between(self, start: float, end: float) -> int:
        """How many checks were allowed in ``[start, end]``."""
        return sum(1 for t in self.allowed_at if start <= t <= end)

    def recorded_between(self, start: float, end: float) -> int:
        """How many RecordSpends were answered OK in ``[start, end]``."""
        return sum(1 for t in self.recorded_at if start <= t <= end)

    def error_codes(self) -> Counter[str]:
        return Counter(text.split(":", 1)[0] for _, _, text in self.errors)

    def summary(self) -> str:
        kinds = Counter(f"{rpc}: {text[:120]}" for _, rpc, text in self.errors)
        return (
            f"checks={dict(self.checks)} records={dict(self.records)} "
            f"slowest={self.slowest:.3f}s errors={kinds.most_common(5)}"
        )


Targets = Callable[[], Sequence[Replica]]


def live(replicas: Sequence[Replica]) -> Targets:
    """The replicas with an open channel, looked up afresh on every cycle (kills, relaunches)."""
    return lambda: [r for r in replicas if r.channel is not None]


async def _call(
    load: FaultLoad, rpc: str, replica: Replica, call: Callable[[], Awaitable[T]]
) -> T | None:
    """The answer, or None after recording the error (and, either way, the latency)."""
    started = time.monotonic()
    try:
        return await call()
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
        where = f"{rpc}@replica-{replica.index}"
        load.errors.append((time.monotonic(), where, f"{code}: {exc.details()}"))
        (load.checks if rpc == "CheckBudget" else load.records)[code] += 1
        return None
    finally:
        load.slowest = max(load.slowest, time.monotonic() - started)


async def _cycle(load: FaultLoad, replica: Replica, key: str, rid: str, rng: random.Random) -> bool:
    """One gateway request; False when an answer was an error."""
    estimate = rng.randint(10, 100)
    cost = rng.randint(0, estimate)
    stub = replica.stub
    decision = await _call(
        load,
        "CheckBudget",
        replica,
        lambda: stub.CheckBudget(
            pb.CheckBudgetRequest(api_key=key, estimated_cost=estimate / 1e6, request_id=rid),
            timeout=DEADLINE,
        ),
    )
    if decision is None:
        return False
    if not decision.allowed:
        load.checks["denied"] += 1
        return True
    load.checks["allowed"] += 1
    load.allowed_at.append(time.monotonic())
    load.attempted[rid] = cost * NANOS_PER_MICRO
    answer = await _call(
        load,
        "RecordSpend",
        replica,
        lambda: stub.RecordSpend(
            pb.RecordSpendRequest(
                request_id=rid, reservation_id=decision.reservation_id, cost=cost / 1e6
            ),
            timeout=DEADLINE,
        ),
    )
    if answer is None:
        return False
    load.records["duplicate" if answer.duplicate else "ok"] += 1
    load.recorded[rid] = cost * NANOS_PER_MICRO
    load.recorded_at.append(time.monotonic())
    return True


async def run_load(
    targets: Targets,
    key: str,
    stop: asyncio.Event,
    *,
    concurrency: int = 16,
    seed: str = "faults",
) -> FaultLoad:
    """Run cycles round-robin over ``targets()`` with ``concurrency`` workers until ``stop``."""
    load = FaultLoad()
    prefix = uuid.uuid4().hex[:10]
    counter = iter(range(10**9))

    async def worker(n: int) -> None:
        rng = random.Random(f"{seed}-{n}")
        while not stop.is_set():
            replicas = targets()
            if not replicas:
                await asyncio.sleep(_BACKOFF)
                continue
            i = next(counter)
            ok = await _cycle(load, replicas[i % len(replicas)], key, f"{prefix}-{i}", rng)
            if not ok:
                await asyncio.sleep(_BACKOFF)

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return load


def start_load(
    targets: Targets, key: str, *, concurrency: int = 16, seed: str = "faults"
) -> tuple[asyncio.Event, asyncio.Future[FaultLoad]]:
    """Start :func:`run_load` in the background: set the event, then await the future."""
    stop = asyncio.Event()
    task = asyncio.ensure_future(run_load(targets, key, stop, concurrency=concurrency, seed=seed))
    return stop, task


def spooled_rows(*data_dirs: Path) -> int:
    """Rows waiting in the spools of replicas (``budgetd.spool_dir`` is <data_dir>/spool).

    Read from outside while budgetd may rename a file to replay it: a file that vanished
    between the listing and the read means counting again.
    """
    for _ in range(20):
        try:
            return sum(
                len(path.read_text().splitlines())
                for data_dir in data_dirs
                for path in (data_dir / "spool").glob("*.jsonl")
                if path.name != "conflicts.jsonl"
            )
        except FileNotFoundError:
            continue
    raise AssertionError("the spool files keep changing under the count")


# --- invariants -------------------------------------------------------------------------


async def assert_every_ok_in_ledger(database_url: str, team_id: str, load: FaultLoad) -> int:
    """Every OK RecordSpend is in the ledger once with its cost; returns the ledger's sum."""
    ledger = await ledger_rows(database_url, team_id)
    missing = {rid: cost for rid, cost in load.recorded.items() if ledger.get(rid) != cost}
    assert not missing, f"{len(missing)} acknowledged spends not in the ledger: {missing}"
    unexplained = {rid: cost for rid, cost in ledger.items() if load.attempted.get(rid) != cost}
    assert not unexplained, f"ledger rows no RecordSpend sent: {unexplained}"
    return sum(ledger.values())


async def assert_counters_match_ledger(
    replicas: Sequence[Replica],
    redis_url: str,
    database_url: str,
    team_id: str,
    key: str,
    *,
    hold_ttl: float,
) -> None:
    """After the holds of unanswered requests expired, Redis counters equal ledger sums.

    Expired holds are released by the next decision of the team (at most 100 per call), so
    zero-estimate checks are sent until nothing is held; they also rebuild any counter that
    is missing, from the ledger.
    """
    await asyncio.sleep(hold_ttl + 0.5)
    total = sum((await ledger_rows(database_url, team_id)).values())
    counters: dict[str, tuple[int, int]] = {}
    for attempt in range(60):
        replica = replicas[attempt % len(replicas)]
        with contextlib.suppress(grpc.aio.AioRpcError):
            await replica.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key), timeout=DEADLINE)
        counters = await redis_counters(redis_url, team_id)
        if len(counters) == 2 and all(held == 0 for _, held in counters.values()):
            break
        await asyncio.sleep(0.05)
    assert sorted(counters.values()) == [(total, 0), (total, 0)], (total, counters)
    for replica in replicas:
        team = await replica.stub.GetTeam(
            pb.GetTeamRequest(team_id=team_id), metadata=ADMIN, timeout=DEADLINE
        )
        assert round(team.spend * 1e9) == total
