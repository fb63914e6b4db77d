"""How budgetd's gRPC services are put on its server, and which methods grpc registers.

grpcio's asyncio server (1.85) keeps one pending "request call" per *registered* method, plus
one for every other method, and for each RPC it accepts it waits on all of them again
(``asyncio.wait`` over N + 1 tasks). So every call pays a little for every registered
method, the admin RPCs nobody calls under load included: a generated
``add_*Servicer_to_server`` registers all of its service's methods. budgetd registers only
the methods on a gateway's request path (:data:`REGISTERED`). Every other method (the admin
RPCs, health, reflection) is served by its generic handler, as grpc serves any method it
was not told of in advance: same handlers, same answers, one handler lookup more per call.

The bench's floor (``bench/floor.py``) puts its no-op services on its server through
:func:`add_service` too, so both register the same methods and pay the same per call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from server.wire_bytes import serialized

# The methods grpc registers in advance: the decision path (CheckBudget, RecordSpend, Envoy's
# ext_authz Check and ext_proc Process). Full method names, as on the wire.
REGISTERED = frozenset(
    {
        "/budgetd.v1.BudgetAuthority/CheckBudget",
        "/budgetd.v1.BudgetAuthority/RecordSpend",
        "/envoy.service.auth.v3.Authorization/Check",
        "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
    }
)


class _Recorder:
    """Stands in for a server while a generated ``add_*Servicer_to_server`` runs."""

    def __init__(self) -> None:
        self.generic: list[grpc.GenericRpcHandler] = []
        self.services: list[tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.services.append((service, handlers))


def add_service(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: grpc.aio.Server,
    *,
    bytes_methods: Collection[str] = (),
    registered: Collection[str] = REGISTERED,
) -> None:
    """``add(servicer, server)`` (a generated ``add_*Servicer_to_server``), except that
    only the methods in ``registered`` are registered in advance and that the unary
    ``bytes_methods`` send bytes their handler returns as they are (:mod:`server.wire_bytes`).
    """
    recorder = _Recorder()
    add(servicer, recorder)
    if not recorder.services:
        # Generated code of an older grpcio-tools registers nothing in advance: as it was.
        if bytes_methods:
            raise ValueError(f"{add.__qualname__} names no methods to answer with bytes")
        server.add_generic_rpc_handlers(recorder.generic)
        return
    for service, handlers in recorder.services:
        table = dict(handlers)
        for name in bytes_methods:
            handler = table[name]
            if handler.unary_unary is None:
                raise ValueError(f"{service}/{name} is not unary: it cannot answer with bytes")
            table[name] = grpc.unary_unary_rpc_method_handler(
                handler.unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=serialized,
            )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))
        ahead = {name: h for name, h in table.items() if f"/{service}/{name}" in registered}
        if ahead:
            server.add_registered_method_handlers(service, ahead)


def add_health_and_reflection(
    server: grpc.aio.Server, health: HealthServicer, services: Sequence[str]
) -> None:
    """grpc.health.v1 (``health``) and server reflection on ``server``; reflection lists
    ``services`` (full names), health and itself."""
    add_service(health_pb2_grpc.add_HealthServicer_to_server, health, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflector = ReflectionServicer((*services, health_name, reflection.SERVICE_NAME))
    add_service(reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflector, server)
