"""Prometheus metrics and the HTTP endpoint that serves them (``/metrics``, ``/healthz``).

Each server owns its registry (no module-level collectors), so several budgetd servers can
live in one process, as they do in the tests.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from server.authority import Decision


class Metrics:
    """budgetd's own counters, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "budgetd_decisions",
            "CheckBudget answers by outcome and denial reason",
            ("outcome", "reason"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "budgetd_rpc_duration_seconds",
            "Time to answer an RPC, by method",
            ("method",),
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )
        self.spends = Counter(
            "budgetd_spend_records",
            "RecordSpend calls by result",
            ("result",),
            registry=self.registry,
        )

    def decision(self, decision: Decision) -> None:
        outcome = "allowed" if decision.allowed else "denied"
        self.decisions.labels(outcome, decision.reason.value).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


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
        return web.Response(
            body=self._metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _serve_health(self, _: web.Request) -> web.Response:
        if self.healthy:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="shutting down\n")
