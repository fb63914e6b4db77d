"""``POST /spend``: gateways that see the response report what a request cost.

Body: ``{"request_id": ..., "cost": 0.0000035}`` or
``{"request_id": ..., "model": "llama3", "usage": {"prompt_tokens": 10, "completion_tokens": 5}}``
(priced by budgetd from its price table), optionally with the ``reservation_id`` the auth
endpoint put in ``x-budget-reservation-id`` and a ``metadata`` object. Without a
reservation_id the spend is charged to the key in ``Authorization: Bearer`` (or
``x-api-key``). Idempotent on request_id: a retry answers ``"duplicate": true``.
"""

from __future__ import annotations

import math
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from google.protobuf import struct_pb2

from clients.gateways import NO_KEY_MESSAGE, credential
from clients.grpc_client import BudgetdClient, pb
from clients.http import HttpError, json_response, read_json_object

# The largest token count budgetd accepts here (int64 on the wire; no real usage is close).
_MAX_TOKENS: Final = 2**53


class SpendEndpoint:
    """The handler of ``POST /spend``."""

    def __init__(self, client: BudgetdClient, *, max_body_bytes: int) -> None:
        self._client = client
        self._max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the bridge's application."""
        return [web.post("/spend", self.spend)]

    async def spend(self, request: web.Request) -> web.Response:
        """Record one request's spend; answers team/key spend after it and ``duplicate``."""
        body = await read_json_object(request, self._max_body_bytes)
        spend = spend_request(body)
        if not spend.reservation_id:
            key, _ = credential(request)
            if key is None:
                raise HttpError(HTTPStatus.UNAUTHORIZED, NO_KEY_MESSAGE)
            spend.api_key = key
        answer = await self._client.record_spend(spend)
        return json_response(
            {
                "request_id": spend.request_id,
                "cost": answer.cost,
                "team_spend": answer.team_spend,
                "key_spend": answer.key_spend,
                "duplicate": answer.duplicate,
            }
        )


def spend_request(body: dict[str, Any]) -> pb.RecordSpendRequest:
    """The RecordSpend request for a ``/spend`` body; HttpError 400 naming a bad field."""
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise _bad("request_id", "is required: a non-empty string naming the request")
    spend = pb.RecordSpendRequest(request_id=request_id)
    reservation_id = body.get("reservation_id")
    if reservation_id is not None:
        if not isinstance(reservation_id, str):
            raise _bad("reservation_id", "must be a string")
        spend.reservation_id = reservation_id
    cost = body.get("cost")
    if cost is not None:
        if isinstance(cost, bool) or not isinstance(cost, int | float) or not math.isfinite(cost):
            raise _bad("cost", "must be a number (USD)")
        spend.cost = float(cost)
        # Model and tokens sent with a cost are recorded too: spend reports group by model.
        _usage(body, spend, required=False)
    else:
        _usage(body, spend)
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata", "must be a JSON object")
        struct = struct_pb2.Struct()
        struct.update(metadata)
        spend.metadata.CopyFrom(struct)
    return spend


def _usage(body: dict[str, Any], spend: pb.RecordSpendRequest, *, required: bool = True) -> None:
    model, usage = body.get("model"), body.get("usage")
    if not required:
        if model is not None and not isinstance(model, str):
            raise _bad("model", "must be a string")
        if usage is not None and not isinstance(usage, dict):
            raise _bad("usage", "must be a JSON object")
        model, usage = model or "", usage or {}
    elif not isinstance(model, str) or not model or not isinstance(usage, dict):
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            "give either cost (USD) or model with usage: "
            '{"prompt_tokens": N, "completion_tokens": N}',
        )
    spend.model = model
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name, 0)
        if value is None:
            value = 0
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TOKENS:
            raise _bad(f"usage.{name}", f"must be a whole number from 0 to {_MAX_TOKENS}")
        setattr(spend, name, value)


def _bad(param: str, problem: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, f"{param} {problem}", param=param)
