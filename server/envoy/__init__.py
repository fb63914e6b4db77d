"""Envoy integration on budgetd's gRPC port: ext_authz (before) and ext_proc (after).

:func:`add_envoy_services` registers both servicers; :data:`SERVICE_NAMES` lists their full
names for server reflection.
"""

from __future__ import annotations

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from server.authority import Authority
from server.envoy import authz, ext_proc
from server.metrics import Metrics
from server.registration import add_service
from server.settings import Settings

SERVICE_NAMES = (authz.SERVICE_NAME, ext_proc.SERVICE_NAME)


def add_envoy_services(
    server: grpc.aio.Server, authority: Authority, settings: Settings, metrics: Metrics
) -> ext_proc.EnvoySpend:
    """Serve Envoy's Authorization and ExternalProcessor on ``server``.

    Returns the ext_proc servicer, whose :meth:`~ext_proc.EnvoySpend.drain` waits for the
    settlements still in flight at shutdown.
    """
    # A hot allow is answered as serialised bytes (server.wire_bytes).
    authorization = authz.EnvoyAuthorization(authority, settings, metrics)
    add_service(
        auth_grpc.add_AuthorizationServicer_to_server, authorization, server,
        bytes_methods=("Check",),
    )  # fmt: skip
    spend = ext_proc.EnvoySpend(authority, settings, metrics)
    add_service(proc_grpc.add_ExternalProcessorServicer_to_server, spend, server)
    return spend
