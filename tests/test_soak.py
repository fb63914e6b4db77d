"""The short form of ``make soak``: 60 s of mixed load with a fault every 12 s."""

from __future__ import annotations

from pathlib import Path

from soak import FAULTS, soak


async def test_sixty_second_soak_loses_nothing_and_counters_equal_the_ledger(
    tmp_path: Path,
) -> None:
    report = await soak(duration=60.0, fault_every=12.0, workdir=tmp_path)
    print(report.line())
    assert set(report.faults) == set(FAULTS), report.line()
    assert report.lost == 0, report.line()
    assert report.drift_nanos == 0, report.line()
    assert report.max_overspend_nanos <= report.bound_nanos, report.line()
    assert report.admitted > 100 and report.denied > 0, report.line()
