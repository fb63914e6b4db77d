"""server/loop_metrics.py: the decision path's lock-free counter and histogram expose exactly
what prometheus_client's Counter and Histogram would for the same updates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

from server.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
LABELS = st.tuples(st.sampled_from(["allowed", "denied"]), st.sampled_from(["", "team", "key"]))
# Values on the bucket bounds themselves (le is inclusive), between them and past the last.
SECONDS = st.one_of(st.sampled_from([0.0, *BUCKETS, 2.5]), st.floats(0, 5, allow_nan=False))


def exposition(registry: CollectorRegistry) -> tuple[list[str], int]:
    """The text exposition without the _created values (wall-clock instants), and how many
    _created samples there were."""
    lines = generate_latest(registry).decode().splitlines()
    created = [line for line in lines if "_created{" in line]
    return [line for line in lines if "_created{" not in line], len(created)


@given(
    counts=st.lists(st.tuples(LABELS, st.integers(1, 3)), max_size=20),
    observed=st.lists(st.tuples(st.sampled_from(["CheckBudget", "RecordSpend"]), SECONDS)),
)
def test_the_exposition_is_prometheus_clients(
    counts: list[tuple[tuple[str, str], int]], observed: list[tuple[str, float]]
) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("x_decisions", "Decisions", ("outcome", "scope"), registry=theirs)
    histogram = Histogram("x_seconds", "Latency", ("method",), buckets=BUCKETS, registry=theirs)
    loop_counter = LoopCounter("x_decisions", "Decisions", ("outcome", "scope"), registry=ours)
    loop_histogram = LoopHistogram("x_seconds", "Latency", "method", BUCKETS, registry=ours)
    for labels, amount in counts:
        counter.labels(*labels).inc(amount)
        loop_counter.inc(labels, amount)
    for method, seconds in observed:
        histogram.labels(method).observe(seconds)
        loop_histogram.observe(method, seconds)
    # Series appear in first-use order in both, so the texts compare line by line.
    assert exposition(ours) == exposition(theirs)


def test_bad_labels_and_buckets_are_refused() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("y", "y", ("a", "b"), registry=registry)
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(("only-one",))
    with pytest.raises(ValueError, match="increasing"):
        LoopHistogram("z", "z", "method", (1.0, 0.5), registry=registry)
