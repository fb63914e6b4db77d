"""One measurement's figures, and how rounds of the same measurement are combined."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The ``pct``-th percentile (nearest rank) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Result:
    """Throughput and latency of one load run against one target.

    ``ok`` counts the answers that were successes (2xx for HTTP, gRPC OK and, for CheckBudget,
    ``allowed``); ``failed`` everything else. Latencies are in milliseconds.
    """

    tool: str
    seconds: float
    ok: int
    failed: int = 0
    rps: float = 0.0
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_latencies(
        cls, tool: str, seconds: float, ok: int, failed: int, latencies_ms: Sequence[float]
    ) -> Result:
        """Figures from raw per-request latencies (of the successful requests)."""
        ordered = sorted(latencies_ms)
        p50, p90, p99 = (percentile(ordered, pct) for pct in PERCENTILES)
        rps = ok / seconds if seconds > 0 else 0.0
        return cls(tool, seconds, ok, failed, rps, p50, p90, p99)

    def to_json(self) -> dict[str, Any]:
        """Plain values (NaN becomes None)."""
        return {
            name: (None if isinstance(value, float) and math.isnan(value) else value)
            for name, value in asdict(self).items()
        }


def combine(rounds: Sequence[Result]) -> Result:
    """Rounds of one measurement: summed counts, median throughput and percentiles."""
    if len(rounds) == 1:
        return rounds[0]

    def median(name: str) -> float:
        values = [getattr(each, name) for each in rounds]
        values = [value for value in values if not math.isnan(value)]
        return statistics.median(values) if values else math.nan

    notes = sorted({note for each in rounds for note in each.notes})
    return Result(
        tool=rounds[0].tool,
        seconds=sum(each.seconds for each in rounds),
        ok=sum(each.ok for each in rounds),
        failed=sum(each.failed for each in rounds),
        rps=median("rps"),
        p50_ms=median("p50_ms"),
        p90_ms=median("p90_ms"),
        p99_ms=median("p99_ms"),
        notes=notes,
    )
