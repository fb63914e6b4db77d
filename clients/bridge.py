"""The HTTP translation client ("the bridge"): budgetd's gRPC API with an HTTP face.

For gateways that cannot speak gRPC (nginx, Traefik, Envoy's HTTP ext_authz) and for
LiteLLM's admin API, so the seed's curl walkthrough runs unchanged. The bridge is a gRPC
*client* of budgetd over one keep-alive channel; it keeps no state and touches no storage,
so any number of bridges may front one budgetd.

    bridge = Bridge(BridgeConfig.from_settings(settings))
    port = await bridge.start()
    ...
    await bridge.stop()
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from clients.admin_ui import AdminUI
from clients.gateways import GatewayAuth
from clients.grpc_client import ADMIN_TIMEOUT, DECISION_TIMEOUT, BudgetdClient
from clients.http import error_body, error_middleware, json_response
from clients.litellm_admin import LiteLLMAdmin
from clients.spend import SpendEndpoint
from clients.spend_reports import SpendReportEndpoints
from server.app import split_address
from server.config import Settings

log = logging.getLogger("budgetd.bridge")

CLIENT_KEY: Final = web.AppKey("budgetd_client", BudgetdClient)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Where the bridge listens, which budgetd it asks, and its limits."""

    listen: str = "127.0.0.1:4000"
    target: str = "127.0.0.1:50051"
    # HTTP status of a budget denial (LiteLLM's 400); see server.denials.
    deny_status: int = 400
    # The largest request body read; larger ones are refused with 413.
    max_body_bytes: int = 1024 * 1024
    decision_timeout: float = DECISION_TIMEOUT
    admin_timeout: float = ADMIN_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings, **changes: Any) -> BridgeConfig:
        """The bridge part of budgetd's settings, with ``changes`` applied."""
        config = cls(
            listen=settings.bridge_listen,
            target=settings.bridge_target,
            deny_status=settings.deny_status,
            max_body_bytes=settings.max_body_bytes,
        )
        return dataclasses.replace(config, **changes) if changes else config


def build_app(client: BudgetdClient, config: BridgeConfig) -> web.Application:
    """The aiohttp application: gateway auth, LiteLLM admin, /spend, spend reports, the admin
    page (/ui/) and health endpoints."""
    # client_max_size bounds what aiohttp buffers; read_body turns the overflow into a 413.
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware])
    app[CLIENT_KEY] = client
    limits = {"max_body_bytes": config.max_body_bytes}
    app.add_routes(GatewayAuth(client, deny_status=config.deny_status, **limits).routes())
    app.add_routes(LiteLLMAdmin(client, **limits).routes())
    app.add_routes(SpendEndpoint(client, **limits).routes())
    app.add_routes(SpendReportEndpoints(client).routes())
    app.add_routes(AdminUI().routes())
    app.add_routes([web.get("/healthz", _liveness), web.get("/health/readiness", _readiness)])
    return app


async def _liveness(request: web.Request) -> web.Response:
    """The bridge is up (says nothing about budgetd)."""
    return json_response({"status": "ok"})


async def _readiness(request: web.Request) -> web.Response:
    """200 when budgetd answers SERVING through the bridge's channel, else 503."""
    client = request.app[CLIENT_KEY]
    if await client.serving():
        return json_response({"status": "ready", "budgetd": client.target})
    message = f"budgetd at {client.target} is not serving"
    return json_response(error_body(503, message), 503)


class Bridge:
    """One running bridge: the aiohttp server and its budgetd client."""

    def __init__(self, config: BridgeConfig, client: BudgetdClient | None = None) -> None:
        self.config = config
        self.client = client or BudgetdClient(
            config.target,
            decision_timeout=config.decision_timeout,
            admin_timeout=config.admin_timeout,
        )
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound listener."""
        host, _ = split_address(self.config.listen)
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    async def start(self) -> int:
        """Open the channel to budgetd and listen; returns the bound port."""
        host, port = split_address(self.config.listen)
        await self.client.open()
        # No access log: the gateway in front logs every request already, and on the
        # decision path a log line per request costs more than the decision itself.
        runner = web.AppRunner(
            build_app(self.client, self.config),
            handle_signals=False,
            shutdown_timeout=5.0,
            access_log=None,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host or None, port, reuse_address=True)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self.client.close()
            raise OSError(f"cannot listen on {self.config.listen}: {exc.strerror or exc}") from exc
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info(
            "budgetd bridge listening on %s (port %d), asking budgetd at %s",
            self.config.listen,
            self.port,
            self.config.target,
        )
        return self.port

    async def stop(self) -> None:
        """Stop listening, finish in-flight requests (up to 5 s), close the channel."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self.client.close()
