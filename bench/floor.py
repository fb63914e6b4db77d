"""The floor: a no-op servicer of budgetd's decision RPCs in budgetd's own runtime.

It serves ``budgetd.v1.BudgetAuthority`` (CheckBudget, RecordSpend) and Envoy's
``envoy.service.auth.v3.Authorization/Check`` with the same generated messages, the same
``grpc.aio`` server options (``server.app._SERVER_OPTIONS``) and the same event loop as
budgetd, and puts the same services on its server the same way
(:func:`server.registration.add_service`: the same methods registered with grpc, which
matters because grpc.aio pays per call for each registered method; the other RPCs and
Envoy's ext_proc answer UNIMPLEMENTED). Each call has its request parsed by grpcio (as
budgetd's are) and gets a prebuilt answer of the same message type with the fields a real
allow fills in. Whatever budgetd spends beyond this is the cost of its budget logic.

Run as its own process: ``python -m bench.floor --port N`` (until SIGTERM / SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import signal
import sys
import time
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc
from google.protobuf import struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

import bench
from server.app import _SERVER_OPTIONS
from server.envoy.wire import set_headers
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc
from server.registration import add_health_and_reflection, add_service

Context = grpc.aio.ServicerContext[Any, Any]

# Fixed facts of the one answer: the shape of a real allow (ids and a reservation id as long
# as budgetd's), so the floor serialises as many bytes as budgetd does.
TEAM_ID = "de35b29e-6ca8-4f47-b804-2b79d07aa99a"
KEY_ID = "key_9f3a55e4cbf96bab1f70e676"
RESERVATION_ID = (
    "r3.ZGUzNWIyOWUtNmNhOC00ZjQ3LWI4MDQtMmI3OWQwN2FhOTlhH2tleV85ZjNhNTVlNG"
    "NiZjk2YmFiMWY3MGU2NzYf.1718318916000.aafe21a957410.0.9B-9b0g0_JBttfMy"
)
KEY_ALIAS = "bench"  # the bench's key has this alias, so budgetd's allow carries it too
MAX_BUDGET = 1_000_000.0
SPEND = 0.25


def budgetd_uses_uvloop() -> bool:
    """True when budgetd's entry points install uvloop (then the floor does too)."""
    sources = [bench.ROOT / "server" / "cli.py", bench.ROOT / "server" / "app.py"]
    mentioned = any("uvloop" in path.read_text() for path in sources if path.exists())
    if not mentioned:
        return False
    return importlib.util.find_spec("uvloop") is not None


def _reset_at() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromSeconds(int(time.time()) // 86_400 * 86_400 + 30 * 86_400)
    return stamp


CHECK_ANSWER = pb.CheckBudgetResponse(
    allowed=True,
    team_id=TEAM_ID,
    key_id=KEY_ID,
    spend=SPEND,
    max_budget=MAX_BUDGET,
    remaining=MAX_BUDGET - SPEND,
    budget_reset_at=_reset_at(),
    reservation_id=RESERVATION_ID,
    scope=pb.SCOPE_TEAM,
    reserved=1e-9,
    key_alias=KEY_ALIAS,
)
RECORD_ANSWER = pb.RecordSpendResponse(team_spend=SPEND, key_spend=SPEND, cost=1e-9)


def _envoy_answer() -> Any:
    """An ext_authz allow as budgetd builds one for the bench's key: x-budget-* headers (its
    alias among them), the key header removed, the decision's facts as dynamic metadata."""
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "allowed": True,
            "team_id": TEAM_ID,
            "key_id": KEY_ID,
            "key_alias": KEY_ALIAS,
            "remaining_usd": MAX_BUDGET - SPEND,
            "reservation_id": RESERVATION_ID,
            "reserved_usd": 0.0,
        }
    )
    headers = {
        "x-budget-team-id": TEAM_ID,
        "x-budget-key-alias": KEY_ALIAS,
        "x-budget-remaining-usd": repr(MAX_BUDGET - SPEND),
        "x-budget-reservation-id": RESERVATION_ID,
        "x-budget-reserved-usd": "0.0",
    }
    response = auth_pb.CheckResponse(
        ok_response=auth_pb.OkHttpResponse(
            headers=set_headers(headers),
            headers_to_remove=["authorization", "x-budget-model"],
        ),
        dynamic_metadata=metadata,
    )
    response.status.code = grpc.StatusCode.OK.value[0]
    return response


ENVOY_ANSWER = _envoy_answer()


class FloorAuthority(pb_grpc.BudgetAuthorityServicer):
    """CheckBudget and RecordSpend with fixed answers; the admin RPCs stay UNIMPLEMENTED."""

    async def CheckBudget(
        self, request: pb.CheckBudgetRequest, context: Context
    ) -> pb.CheckBudgetResponse:
        """A fixed allow (the request was parsed by grpcio on the way in)."""
        return CHECK_ANSWER

    async def RecordSpend(
        self, request: pb.RecordSpendRequest, context: Context
    ) -> pb.RecordSpendResponse:
        """A fixed acknowledgement."""
        return RECORD_ANSWER


# xds-protos ships no type information, so its servicer base class is Any to mypy.
class FloorAuthorization(auth_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ext_authz Check with a fixed allow."""

    async def Check(self, request: Any, context: Context) -> Any:
        """A fixed OK CheckResponse."""
        return ENVOY_ANSWER


def add_services(server: grpc.aio.Server) -> HealthServicer:
    """budgetd's services on ``server``, registered as budgetd registers them; the floor's
    health servicer, to set SERVING once the server runs."""
    # The generated stub marks every RPC abstract; the ones not overridden answer UNIMPLEMENTED.
    authority = FloorAuthority()  # type: ignore[abstract]
    add_service(
        pb_grpc.add_BudgetAuthorityServicer_to_server, authority, server,
        bytes_methods=("CheckBudget",),
    )  # fmt: skip
    add_service(
        auth_grpc.add_AuthorizationServicer_to_server, FloorAuthorization(), server,
        bytes_methods=("Check",),
    )  # fmt: skip
    processor = proc_grpc.ExternalProcessorServicer()  # (Process: UNIMPLEMENTED)
    add_service(proc_grpc.add_ExternalProcessorServicer_to_server, processor, server)
    health = HealthServicer()
    names = (
        pb.DESCRIPTOR.services_by_name["BudgetAuthority"].full_name,
        auth_pb.DESCRIPTOR.services_by_name["Authorization"].full_name,
    )
    add_health_and_reflection(server, health, names)
    return health


async def serve(port: int) -> None:
    """Serve the floor on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    health = add_services(server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot bind 127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.floor --port N``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="auto: uvloop when budgetd installs it",
    )
    args = parser.parse_args(argv)
    use_uvloop = args.loop == "uvloop" or (args.loop == "auto" and budgetd_uses_uvloop())
    with contextlib.suppress(KeyboardInterrupt):
        if use_uvloop:
            importlib.import_module("uvloop").run(serve(args.port))
        else:
            asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
