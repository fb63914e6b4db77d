"""A counter and a latency histogram for the decision path, kept in plain integers.

prometheus_client's Counter and Histogram take a lock on every update, as they must when any
thread may update them. budgetd updates these two only on its event loop, and scrapes read
them on the same loop (:class:`server.metrics.MetricsServer`), so a scrape always sees whole
updates without a lock. On a hot CheckBudget the locked updates were a measurable part of
the whole answer (README, Performance); here an update is a dict or list increment.

The exposition is prometheus_client's: a counter family has ``<name>_total`` and
``<name>_created`` per label set, a histogram ``_bucket`` (cumulative, ``le`` inclusive),
``_count``, ``_sum`` and ``_created``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class LoopCounter(Collector):
    """A labelled counter updated from the event loop only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], int] = {}
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def inc(self, labels: tuple[str, ...], amount: int = 1) -> None:
        """Add ``amount`` to the series of ``labels`` (in ``labelnames`` order)."""
        value = self._values.get(labels)
        if value is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, got {labels}")
            self._created[labels] = time.time()
            value = 0
        self._values[labels] = value + amount

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, "counter")
        for labels, value in self._values.items():
            named = dict(zip(self._labelnames, labels, strict=True))
            metric.add_sample(f"{self._name}_total", named, float(value))
            metric.add_sample(f"{self._name}_created", named, self._created[labels])
        yield metric


class _Series:
    __slots__ = ("counts", "created", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets  # per bucket, not cumulative; the last one is +Inf
        self.total = 0.0
        self.created = time.time()


class LoopHistogram(Collector):
    """A histogram with one label, observed from the event loop only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelname: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"{name}: buckets must be increasing, got {buckets}")
        self._name = name
        self._documentation = documentation
        self._labelname = labelname
        self._bounds = bounds
        self._series: dict[str, _Series] = {}
        registry.register(self)

    def observe(self, label: str, value: float) -> None:
        """Count ``value`` in the series of ``label``."""
        series = self._series.get(label)
        if series is None:
            series = self._series[label] = _Series(len(self._bounds) + 1)
        # The first bound >= value: Prometheus buckets are "less than or equal".
        series.counts[bisect.bisect_left(self._bounds, value)] += 1
        series.total += value

    def collect(self) -> Iterable[Metric]:
        metric = Metric(self._name, self._documentation, "histogram")
        bounds = [*map(floatToGoString, self._bounds), "+Inf"]
        for label, series in self._series.items():
            cumulative = 0
            for bound, count in zip(bounds, series.counts, strict=True):
                cumulative += count
                metric.add_sample(
                    f"{self._name}_bucket", {self._labelname: label, "le": bound}, cumulative
                )
            named = {self._labelname: label}
            metric.add_sample(f"{self._name}_count", named, cumulative)
            metric.add_sample(f"{self._name}_sum", named, series.total)
            metric.add_sample(f"{self._name}_created", named, series.created)
        yield metric
