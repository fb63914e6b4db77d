"""The bench's report (bench/report.py): ratios round by round next to the combined one."""

from __future__ import annotations

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.report import Row  # noqa: E402
from bench.stats import Result  # noqa: E402


def test_paired_ratios_pair_each_round_with_its_own_reference() -> None:
    assert report.paired_ratios([90.0, 80.0, 120.0], [100.0, 100.0, 100.0]) == (0.9, 0.8, 1.2)
    # A round the reference answered nothing in has no ratio, rather than an error.
    assert report.paired_ratios([1.0, 2.0], [0.0, math.nan]) == (None, None)


def test_the_table_notes_each_rounds_ratio() -> None:
    subject = Result("h2load", 10.0, ok=9_000, rps=900.0, p50_ms=1.0, p99_ms=2.0)
    floor = Result("h2load", 10.0, ok=10_000, rps=1_000.0, p50_ms=1.0, p99_ms=2.0)
    row = Row(
        "CheckBudget (h2load)", subject, floor, 0.9, ">= 0.90x floor req/s", True,
        "check_vs_floor_throughput", rounds=(0.93, 0.83, 1.14),
    )  # fmt: skip
    text = report.table([row], [])
    assert "  CheckBudget (h2load): per round 0.93, 0.83, 1.14" in text.splitlines()
    alone = Row("one round", subject, floor, 0.9, "", None, rounds=(0.9,))
    assert "per round" not in report.table([alone], [])
