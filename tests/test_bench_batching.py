"""The bench's batching figures (bench/run.py): rows per ledger commit and script calls per
Redis round trip under budgetd's RecordSpend load, read from budgetd's own counters."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import batching, batching_summary, counters_of  # noqa: E402
from server.metrics import Metrics  # noqa: E402
from server.storage.batching import BatchCounts  # noqa: E402


class Counted:
    """A store whose batching path has sent ``counts`` so far."""

    def __init__(self, counts: BatchCounts | None) -> None:
        self.counts = counts

    def batch_counts(self) -> BatchCounts | None:
        return self.counts


def exposition(ledger: BatchCounts | None, redis: BatchCounts | None) -> str:
    """budgetd's /metrics text with these batchers behind it."""
    metrics = Metrics()
    metrics.watch_batching(Counted(ledger), Counted(redis))
    return metrics.exposition().decode()


def test_the_counters_come_from_budgetds_own_exposition() -> None:
    text = exposition(BatchCounts(10, 25), BatchCounts(40, 200))
    counters = counters_of(text)
    assert counters["budgetd_ledger_group_commits_total"] == 10
    assert counters["budgetd_ledger_group_commit_rows_total"] == 25
    assert counters["budgetd_redis_script_round_trips_total"] == 40
    assert counters["budgetd_redis_script_calls_total"] == 200


def test_a_store_without_a_batching_path_has_no_series() -> None:
    text = exposition(BatchCounts(3, 3), None)  # a Redis Cluster: no script pipelines
    assert "budgetd_ledger_group_commits_total 3.0" in text
    assert "budgetd_redis_script" not in text
    assert "budgetd_ledger" not in exposition(None, None)


def test_batching_is_what_grew_between_two_scrapes() -> None:
    before = counters_of(exposition(BatchCounts(10, 25), BatchCounts(40, 200)))
    after = counters_of(exposition(BatchCounts(110, 375), BatchCounts(140, 800)))
    grew = batching(before, after)
    assert grew["ledger_group_commits"] == 100
    assert grew["ledger_group_commit_rows"] == 350
    assert grew["rows_per_commit"] == 3.5
    assert grew["calls_per_round_trip"] == 6.0


def test_nothing_sent_has_no_ratio_and_the_summary_takes_medians() -> None:
    idle = counters_of(exposition(BatchCounts(5, 5), BatchCounts(0, 0)))
    quiet = batching(idle, idle)
    assert quiet["rows_per_commit"] is None and quiet["calls_per_round_trip"] is None
    rounds: list[dict[str, float | None]] = [
        {"rows_per_commit": 2.0, "calls_per_round_trip": 5.0},
        {"rows_per_commit": 3.0, "calls_per_round_trip": None},
        {"rows_per_commit": 10.0, "calls_per_round_trip": 7.0},
    ]
    summary = batching_summary(rounds)
    assert summary["rows_per_commit"] == 3.0
    assert summary["calls_per_round_trip"] == 6.0
    assert summary["per_round"] == rounds
    assert batching_summary([])["rows_per_commit"] is None
