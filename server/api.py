"""The gRPC face of budgetd.v1.BudgetAuthority: wire messages in, domain calls, wire out.

This module holds the servicer and its decision RPCs (CheckBudget, RecordSpend) with
_decide; the admin RPCs are inherited from server/api_admin.py and the wire conversions
live in server/api_wire.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TypeVar

from google.protobuf import json_format

from server import answers, request_log
from server.admin import Admin
from server.api_admin import AdminRpcs
from server.api_wire import Context, WireDecisions, abort, opt
from server.authority import Authority, CheckRequest, SpendRequest
from server.errors import BudgetdError
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc
from server.metrics import Metrics
from server.money import nanos_to_usd
from server.reports import SpendReports

T = TypeVar("T")


class BudgetAuthorityService(AdminRpcs, pb_grpc.BudgetAuthorityServicer):
    """Servicer: converts messages and maps domain errors through the one error table."""

    def __init__(
        self,
        authority: Authority,
        admin: Admin,
        master_key: str | None,
        metrics: Metrics,
        reports: SpendReports,
    ) -> None:
        self._authority = authority
        self._admin = admin
        self._master_key = master_key
        self._metrics = metrics
        self._reports = reports
        self._wire = WireDecisions()

    # A hot allow is answered as serialised bytes (server.wire_bytes): the method is
    # registered with a response serialiser that sends bytes as they are (server.app).
    async def CheckBudget(  # type: ignore[override]
        self, request: pb.CheckBudgetRequest, context: Context
    ) -> pb.CheckBudgetResponse | bytes:
        started = time.perf_counter()
        # A busy key's allow straight off the wire (server.hot); anything else, in full.
        hot = self._authority.check_hot(
            request.api_key,
            request.model,
            request.user_id,
            request.request_id,
            request.estimated_cost if request.HasField("estimated_cost") else None,
            request.max_tokens if request.HasField("max_tokens") else None,
            request.prompt_tokens if request.HasField("prompt_tokens") else None,
        )
        if hot is not None:
            seconds = time.perf_counter() - started
            self._metrics.latency.observe("CheckBudget", seconds)  # (one call less)
            self._metrics.hot_decision(hot.template)  # by outcome, reason and scope
            if request_log.decisions_logged():
                decision = answers.admitted(*hot)
                request_log.decision("CheckBudget", request.request_id, decision, seconds)
            return self._wire.hot(hot)
        req = CheckRequest(
            api_key=request.api_key,
            model=request.model,
            estimated_cost=opt(request, "estimated_cost"),
            request_id=request.request_id,
            user_id=request.user_id,
            max_tokens=opt(request, "max_tokens"),
            prompt_tokens=opt(request, "prompt_tokens"),
            jwt=request.jwt,
        )
        call = self._authority.check(req)
        decision, seconds = await self._decide(context, "CheckBudget", req.request_id, call)
        self._metrics.decision(decision)
        request_log.decision("CheckBudget", req.request_id, decision, seconds)
        return self._wire.convert(decision)

    async def RecordSpend(
        self, request: pb.RecordSpendRequest, context: Context
    ) -> pb.RecordSpendResponse:
        req = SpendRequest(
            request_id=request.request_id,
            reservation_id=request.reservation_id,
            api_key=request.api_key,
            cost=opt(request, "cost"),
            model=request.model,
            prompt_tokens=request.prompt_tokens,
            completion_tokens=request.completion_tokens,
            # Most spends carry no metadata: skip the (slow, pure-Python) conversion then.
            metadata=json_format.MessageToDict(request.metadata) if request.metadata.fields else {},
        )
        call = self._authority.record(req)
        result, seconds = await self._decide(context, "RecordSpend", req.request_id, call)
        self._metrics.spend(result)
        request_log.spend("RecordSpend", req.request_id, result, seconds)
        return pb.RecordSpendResponse(
            team_spend=nanos_to_usd(result.team_spend_nanos),
            key_spend=nanos_to_usd(result.key_spend_nanos),
            duplicate=result.duplicate,
            cost=nanos_to_usd(result.cost_nanos),
        )

    async def _decide(
        self, context: Context, rpc: str, request_id: str, call: Awaitable[T]
    ) -> tuple[T, float]:
        """Await a decision-path call, timed into the latency histogram; a failure is
        counted, logged and answered with its status from the error table."""
        started = time.perf_counter()
        try:
            answer = await call
        except BudgetdError as exc:
            seconds = time.perf_counter() - started
            self._metrics.observe_latency(rpc, seconds)
            self._metrics.failure(exc)
            request_log.failure(rpc, request_id, exc, seconds)
            await abort(context, exc)
        seconds = time.perf_counter() - started
        self._metrics.observe_latency(rpc, seconds)
        return answer, seconds
