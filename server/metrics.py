"""Prometheus metrics and the HTTP endpoint that serves them (``/metrics``, ``/healthz``).

Each server owns its registry (no module-level collectors), so several budgetd servers can
live in one process, as they do in the tests.

Values that live in shared state (every team's and key's budget, holds, counter drift) are
read at scrape time by :class:`server.budget_metrics.BudgetCollector`, through the hooks
run by :meth:`Metrics.before_scrape`; everything else here is counted as it happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from server.authority import Decision, SpendResult
from server.budget_metrics import SpendTotals, backend_of
from server.errors import BudgetdError, Unavailable
from server.loop_metrics import LoopCounter, LoopHistogram
from server.storage.batching import Batching

if TYPE_CHECKING:
    from aiohttp import web


# A hot-path template's decision labels, in its Decision.forms.
_HOT_LABELS = "metric_labels"


class Metrics:
    """budgetd's own counters, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Updated on every decision, from the event loop only: plain integers, no locks.
        self.decisions = LoopCounter(
            "budgetd_decisions",
            "CheckBudget answers by outcome, denial reason and the scope (key, team) that decided",
            ("outcome", "reason", "scope"),
            registry=self.registry,
        )
        self.latency = LoopHistogram(
            "budgetd_rpc_duration_seconds",
            "Time to answer an RPC, by method",
            "method",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.soft_budget = Counter(
            "budgetd_soft_budget_exceeded",
            "Requests allowed while their key's or team's spend is over its soft_budget",
            ("team_id",),
            registry=self.registry,
        )
        self.spends = LoopCounter(
            "budgetd_spend_records",
            "RecordSpend calls by result",
            ("result",),
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "budgetd_backend_errors",
            "Calls answered UNAVAILABLE because a backend (postgres, redis, sqlite) failed",
            ("backend",),
            registry=self.registry,
        )
        # Failure behaviour (DESIGN §8): read from the spool and the counter store.
        self.spool_depth = Gauge(
            "budgetd_spool_depth",
            "Acknowledged spends kept on local disk while Postgres is down, not yet in the ledger",
            registry=self.registry,
        )
        self.counters_on_postgres = Gauge(
            "budgetd_counters_on_postgres",
            "1 while this replica decides on the exact Postgres path because Redis is down",
            registry=self.registry,
        )
        self.counter_failovers = Counter(
            "budgetd_counter_failovers",
            "Times this replica switched its counters from Redis to the Postgres path",
            registry=self.registry,
        )
        # budgetd_spend_usd_total{team_id}: summed in exact nano-USD, exposed as USD.
        self.spend_totals = SpendTotals()
        self.registry.register(self.spend_totals)
        self.batching = BatchingCollector()
        self.registry.register(self.batching)
        self._scrape_hooks: list[Callable[[], Awaitable[None]]] = []

    def decision(self, decision: Decision) -> None:
        """Count a CheckBudget (or Envoy Check) answer."""
        self.decisions.inc(_labels(decision))
        if decision.soft_budget_exceeded:
            self.soft_budget.labels(decision.team_id).inc()

    def hot_decision(self, template: Decision) -> None:
        """Count a hot-path allow (server.hot) by its template, whose labels are worked
        out once: on a loaded event loop every Python call costs a microsecond or so."""
        labels = template.forms.get(_HOT_LABELS)
        if labels is None:
            labels = template.forms[_HOT_LABELS] = _labels(template)
        self.decisions.inc(labels)
        if template.soft_budget_exceeded:
            self.soft_budget.labels(template.team_id).inc()

    def observe_latency(self, rpc: str, seconds: float) -> None:
        """One answer of ``rpc`` into the latency histogram."""
        self.latency.observe(rpc, seconds)

    def spend(self, result: SpendResult) -> None:
        """Count a RecordSpend; only an applied one (not a duplicate) adds to the team's spend."""
        self.spends.inc(("duplicate",) if result.duplicate else ("recorded",))
        if not result.duplicate:
            self.spend_totals.add(result.team_id, result.cost_nanos)

    def failure(self, error: BudgetdError) -> None:
        """Count a call that failed because a backend was unavailable."""
        if isinstance(error, Unavailable):
            self.backend_errors.labels(backend_of(error)).inc()

    def watch_failures(
        self, spool_depth: Callable[[], int] | None, on_postgres: Callable[[], bool] | None
    ) -> None:
        """Read the spool's depth and the counters' fallback state at each scrape."""
        if spool_depth is not None:
            self.spool_depth.set_function(lambda: float(spool_depth()))
        if on_postgres is not None:
            self.counters_on_postgres.set_function(lambda: float(on_postgres()))

    def watch_batching(self, ledger: Batching | None, redis: Batching | None) -> None:
        """Read the ledger's group commits and the Redis script pipelines at each scrape."""
        self.batching.ledger = ledger
        self.batching.redis = redis

    def on_scrape(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run ``hook`` before each scrape (to read values that live in shared state)."""
        self._scrape_hooks.append(hook)

    async def before_scrape(self) -> None:
        for hook in self._scrape_hooks:
            await hook()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BatchingCollector(Collector):
    """How well concurrent calls share round trips, read from the stores at scrape time.

    Every RecordSpend writes one ledger row and makes two Redis script calls; under load
    those go out together (``server.storage.batching``, ``server.storage.redis_pipeline``).
    Rows per group commit and calls per Redis round trip are the ratios of these counters,
    so an operator can see whether grouping works without any cost on the request path:
    the batchers keep plain integers, and they are read only here.
    """

    def __init__(self) -> None:
        self.ledger: Batching | None = None
        self.redis: Batching | None = None

    def collect(self) -> Iterator[Metric]:
        families = (
            (
                self.ledger,
                "budgetd_ledger_group_commits",
                "Ledger flushes: each writes the rows of the RecordSpends waiting for it in "
                "one statement and one commit",
                "budgetd_ledger_group_commit_rows",
                "Ledger rows written by those flushes (rows / flushes: the mean group)",
            ),
            (
                self.redis,
                "budgetd_redis_script_round_trips",
                "Round trips of budgetd's Redis scripts: pipelines of concurrent calls, and "
                "calls sent alone",
                "budgetd_redis_script_calls",
                "Redis script calls those round trips carried (calls / round trips: the mean "
                "pipeline)",
            ),
        )
        for store, trips_name, trips_doc, calls_name, calls_doc in families:
            counts = store.batch_counts() if store is not None else None
            if counts is not None:
                yield CounterMetricFamily(trips_name, trips_doc, value=counts.round_trips)
                yield CounterMetricFamily(calls_name, calls_doc, value=counts.calls)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/healthz`` on the metrics address."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.healthy = False

    async def start(self) -> int:
        # aiohttp is loaded by the first MetricsServer, not by every importer of Metrics:
        # a start with metrics off (or a process that only counts) never pays for it.
        from aiohttp import web  # noqa: PLC0415

        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/healthz", self._serve_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        self.healthy = True
        return self.port

    async def stop(self) -> None:
        self.healthy = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, _: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415 - loaded by start()

        await self._metrics.before_scrape()
        return web.Response(
            body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _serve_health(self, _: web.Request) -> web.Response:
        from aiohttp import web  # noqa: PLC0415 - loaded by start()

        if self.healthy:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="shutting down\n")


def _labels(decision: Decision) -> tuple[str, str, str]:
    """A decision's labels on budgetd_decisions_total: outcome, reason, scope."""
    outcome = "allowed" if decision.allowed else "denied"
    scope = decision.scope.value if decision.scope else ""
    return (outcome, decision.reason.value, scope)
