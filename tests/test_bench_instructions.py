"""bench/instructions.py: instructions per CheckBudget, counted by callgrind."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import instructions  # noqa: E402

DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
cmd:  python -m bench.floor --port 1
part: 1
events: Ir
summary: 0
totals: 1435096422
"""


def test_the_count_is_the_dumps_totals_line() -> None:
    assert instructions.totals(DUMP) == 1_435_096_422
    with pytest.raises(ValueError, match="totals"):
        instructions.totals(DUMP.replace("totals:", "total"))


def test_each_source_is_reported_per_request_and_against_the_first() -> None:
    counts = [
        instructions.Count("0:floor", 1_434_000_000, 3000),
        instructions.Count("1:.", 1_677_780_000, 3000),
    ]
    assert counts[1].per_request == 559_260
    table = instructions.report(counts).splitlines()
    assert table[0].split()[:2] == ["source", "instructions/request"]
    assert table[1].split() == ["0:floor", "478,000", "1.000"]
    assert table[2].split() == ["1:.", "559,260", "1.170"]


def test_only_floors_or_no_requests_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        instructions.parse_args(["floor"])
    assert "at least one budgetd source" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        instructions.parse_args([".", "--requests", "0"])
    assert "--requests must be positive" in capsys.readouterr().err


@pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("valgrind", "callgrind_control", "h2load")),
    reason="needs Debian's valgrind and nghttp2-client",
)
def test_a_live_count_of_budgetd_against_the_floor(capsys: pytest.CaptureFixture[str]) -> None:
    # Few requests (the steady hot state needs a few thousand): this checks the plumbing.
    assert instructions.main(["floor", ".", "--requests", "200", "--warmup", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    floor, budgetd = (line.split() for line in lines[1:3])
    assert floor[0] == "0:floor" and budgetd[0] == "1:."
    floor_count, budgetd_count = (int(row[1].replace(",", "")) for row in (floor, budgetd))
    # A gRPC round trip in Python takes some hundreds of thousands of instructions, and
    # budgetd's answer does more than the floor's fixed one.
    assert 100_000 < floor_count < 5_000_000
    assert budgetd_count > floor_count
    assert float(budgetd[2]) == pytest.approx(budgetd_count / floor_count, abs=0.001)
