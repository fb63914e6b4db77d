"""The bench's CPU accounting (bench/cpu.py) and its table (bench/report.py): a busy process
is charged to its own group, the rest of the machine to ``other``, per request."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import cpu, report  # noqa: E402
from bench.services import process_tree  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu.supported(), reason="needs Linux /proc")

# A child that burns CPU until killed.
_SPIN = "import time\nwhile True:\n    sum(range(10_000))\n"


@pytest.fixture
def spinner() -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", _SPIN])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_process_seconds_grow_with_work_and_ignore_gone_processes() -> None:
    before = cpu.process_seconds([os.getpid()])
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        sum(range(10_000))
    after = cpu.process_seconds([os.getpid()])
    assert after - before >= 0.1
    assert cpu.process_seconds([2**22 + 12345]) == 0.0  # no such process: counts nothing


def test_machine_busy_seconds_never_go_back() -> None:
    first = cpu.machine_busy_seconds()
    sum(range(1_000_000))
    assert cpu.machine_busy_seconds() >= first > 0


async def test_window_charges_a_busy_server_to_its_group(
    spinner: subprocess.Popen[bytes],
) -> None:
    meter = cpu.CpuMeter({"server": spinner.pid, "postgres": None})
    used, length = await meter.window(0.1, 1.0)
    assert 0.9 <= length < 2.0
    # The spinner runs flat out on one core; nothing else here is busy for long.
    assert used["server"] >= 0.5
    # The spinner is one thread: its event-loop figure is all of it, on a core of its own.
    assert used["loop"] == pytest.approx(used["server"], abs=0.05)
    assert "postgres" not in used  # a group without a process is not made up
    assert used["total"] >= used["server"] * 0.9
    assert used["load"] < 0.3  # this test process only sleeps


async def test_idle_servers_are_not_the_load_generator(
    spinner: subprocess.Popen[bytes],
) -> None:
    meter = cpu.CpuMeter({}, idle=[spinner.pid])
    used, _ = await meter.window(0.0, 0.6)
    assert used["load"] < 0.2
    figures = cpu.per_request(used, 1000)
    assert figures["other"] is not None and figures["other"] >= 250  # the spinner's share


def test_per_request_splits_the_machine_and_keeps_other_non_negative() -> None:
    used = {"server": 0.5, "redis": 0.1, "load": 0.2, "total": 1.0}
    figures = cpu.per_request(used, 1000)
    assert figures["server"] == pytest.approx(500)
    assert figures["redis"] == pytest.approx(100)
    assert figures["load"] == pytest.approx(200)
    assert figures["other"] == pytest.approx(200)
    assert figures["total"] == pytest.approx(1000)
    assert figures["envoy"] is None and figures["postgres"] is None
    # Sampling granularity can make the groups add up to more than the machine: not negative.
    assert cpu.per_request({"server": 1.0, "load": 0.1, "total": 1.0}, 10)["other"] == 0.0
    assert set(cpu.per_request(used, 0).values()) == {None}


def test_the_loop_thread_is_part_of_the_server_and_its_busy_share_is_per_cent() -> None:
    used = {"server": 0.5, "loop": 0.45, "load": 0.2, "total": 1.0}
    figures = cpu.per_request(used, 1000, seconds=0.5)
    assert figures["loop"] == pytest.approx(450)
    assert figures["other"] == pytest.approx(300)  # the loop is not counted twice
    assert figures[cpu.LOOP_BUSY] == pytest.approx(90)
    assert cpu.per_request(used, 1000)[cpu.LOOP_BUSY] is None  # no window length given
    assert cpu.per_request({"total": 1.0}, 1000, seconds=1.0)[cpu.LOOP_BUSY] is None


def test_a_server_of_several_processes_has_no_loop_figure() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
         "time.sleep(30)"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(process_tree(parent.pid)) == 2
        assert "loop" not in cpu.CpuMeter({"server": parent.pid}).snapshot()
    finally:
        for pid in process_tree(parent.pid)[1:]:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()


def test_cpu_medians_and_table() -> None:
    rounds: dict[str, dict[str, list[dict[str, float | None]]]] = {
        "h2load_check": {
            "budgetd": [
                {"server": 100.0, "envoy": None, "total": 300.0},
                {"server": 140.0, "envoy": None, "total": 340.0},
                {"server": 120.0, "envoy": None, "total": 320.0},
            ],
            "floor": [{"server": 90.0, "total": 250.0}],
        }
    }
    medians = report.cpu_medians(rounds)
    assert medians["h2load_check"]["budgetd"] == {"envoy": None, "server": 120.0, "total": 320.0}
    text = report.cpu_table(medians, cpu.COLUMNS)
    lines = text.splitlines()
    assert lines[0].split() == ["CPU", "us", "per", "request", *cpu.COLUMNS]
    floor_line = next(line for line in lines if line.startswith("CheckBudget h2load, floor"))
    assert floor_line.split()[-9:] == ["90", "-", "-", "-", "-", "-", "-", "250", "-"]
    assert report.cpu_table({}, cpu.GROUPS) == ""


def test_window_is_cancellable() -> None:
    async def run() -> None:
        task = asyncio.create_task(cpu.CpuMeter({}).window(5.0, 5.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
