"""Spend through Envoy's external processing: ``envoy.service.ext_proc.v3.ExternalProcessor``.

Envoy's ``envoy.filters.http.ext_proc`` filter, placed after ext_authz, streams each request's
headers and the response's headers and body here. budgetd never changes anything: every
message is answered with an empty "continue" of its kind. Meanwhile it

1. links the exchange to its hold from the request headers ext_authz added
   (``x-budget-reservation-id``, ``x-budget-reserved-usd``, ``x-budget-model``) and uses
   ``x-request-id`` as the spend's ``request_id``;
2. takes the cost from an ``x-litellm-response-cost`` response header when the upstream
   sends one, else the ``usage`` of the JSON body or of the SSE stream (response body mode
   BUFFERED or STREAMED), priced by the model's configured price;
3. settles the hold with ``Authority.record`` before answering the last body message, so a
   client that has the whole response can count on its spend being counted;
4. when no cost can be found (the upstream failed, returned no usage, or the client left
   and Envoy closed the stream early) applies ``budgetd.incomplete_response``: ``release``
   drops the hold and charges nothing, ``estimate`` charges what was held.

A failure to record is logged and never breaks the response stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as proc_pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as proc_grpc

from server import request_log
from server.authority import Authority, SpendRequest
from server.denials import HEADER_MODEL, HEADER_RESERVATION_ID, HEADER_RESERVED
from server.envoy.openai import Usage, UsageReader
from server.envoy.wire import header_values
from server.errors import BudgetdError, FailedPrecondition
from server.metrics import Metrics
from server.money import MAX_USD
from server.pricing import Price
from server.settings import Settings
from server.validation import MAX_TEXT

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
COST_HEADER = "x-litellm-response-cost"
log = logging.getLogger("budgetd.envoy")
Context = grpc.aio.ServicerContext[Any, Any]

# The empty answer that lets each kind of message Envoy sends continue unchanged.
_CONTINUE = MappingProxyType(
    {
        "request_headers": "HeadersResponse",
        "response_headers": "HeadersResponse",
        "request_body": "BodyResponse",
        "response_body": "BodyResponse",
        "request_trailers": "TrailersResponse",
        "response_trailers": "TrailersResponse",
    }
)


def continue_response(kind: str) -> Any:
    """The "continue, change nothing" ProcessingResponse for a message of ``kind``."""
    return proc_pb.ProcessingResponse(**{kind: getattr(proc_pb, _CONTINUE[kind])()})


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to do with a hold: record ``spend``, or (``spend`` None) release it."""

    reservation_id: str
    spend: SpendRequest | None
    why: str


@dataclass(slots=True)
class Exchange:
    """One request/response seen through ext_proc; decides how its hold is settled.

    Pure state machine (no I/O), fed the messages of one ``Process`` stream in order.
    """

    incomplete_response: str
    max_body_bytes: int
    prices: Mapping[str, Price]
    reservation_id: str = ""
    request_id: str = ""
    model: str = ""
    reserved_usd: float = 0.0
    status: int = 0
    reader: UsageReader | None = None
    settled: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def request_headers(self, headers: dict[str, str]) -> None:
        """The request as it left ext_authz: which hold it has."""
        self.reservation_id = headers.get(HEADER_RESERVATION_ID, "")
        self.model = headers.get(HEADER_MODEL, "")
        self.reserved_usd = _usd(headers.get(HEADER_RESERVED)) or 0.0
        x_request_id = headers.get("x-request-id", "")
        if x_request_id:
            self.metadata["x_request_id"] = x_request_id[:MAX_TEXT]
        self.request_id = spend_request_id(x_request_id, self.reservation_id)

    def response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Settlement | None:
        """The upstream's answer starts: a cost header settles now, else read the body."""
        if not self._active():
            return None
        self.status = _int(headers.get(":status"))
        cost = _usd(headers.get(COST_HEADER))
        if cost is not None:
            return self._charge(
                SpendRequest(**self._spend(cost=cost), metadata=self._meta("cost_header"))
            )
        self.reader = UsageReader(
            headers.get("content-type", ""),
            headers.get("content-encoding", ""),
            self.max_body_bytes,
        )
        return self.end() if end_of_stream else None

    def response_body(self, chunk: bytes, end_of_stream: bool) -> Settlement | None:
        """A piece of the response body (all of it when Envoy buffers)."""
        if not self._active() or self.reader is None:
            return None
        self.reader.feed(chunk)
        return self.end() if end_of_stream else None

    def end(self) -> Settlement | None:
        """The response is over (or the stream is): settle what is known."""
        if not self._active():
            return None
        usage = self.reader.finish() if self.reader is not None else None
        if usage is not None:
            priced = self._priced(usage)
            if priced is not None:
                return self._charge(priced)
        return self._incomplete()

    def _active(self) -> bool:
        return bool(self.reservation_id) and not self.settled

    def _priced(self, usage: Usage) -> SpendRequest | None:
        # The request's model names the price (a response often names a dated variant).
        model = self.model if self.model in self.prices else usage.model
        if model not in self.prices:
            log.warning(
                "usage of request %s not charged: no price for model %r (add it to model_list)",
                self.request_id,
                self.model or usage.model,
            )
            return None
        return SpendRequest(
            **self._spend(model=model),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            metadata=self._meta("usage"),
        )

    def _incomplete(self) -> Settlement:
        why = f"no usage (status {self.status or 'none'})"
        if self.incomplete_response == "estimate":
            spend = SpendRequest(**self._spend(cost=self.reserved_usd), metadata=self._meta(why))
            return self._charge(spend, why)
        self.settled = True
        return Settlement(self.reservation_id, None, why)

    def _charge(self, spend: SpendRequest, why: str = "") -> Settlement:
        self.settled = True
        return Settlement(self.reservation_id, spend, why or str(spend.metadata.get("source")))

    def _spend(self, **values: Any) -> dict[str, Any]:
        return {"request_id": self.request_id, "reservation_id": self.reservation_id, **values}

    def _meta(self, source: str) -> dict[str, Any]:
        meta = {**self.metadata, "source": source}
        if self.status:
            meta["status"] = self.status
        return meta


# xds-protos ships no type information, so its servicer base class is Any to mypy.
class EnvoySpend(proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``ExternalProcessor/Process``: watch the response, settle the hold, change nothing."""

    def __init__(self, authority: Authority, settings: Settings, metrics: Metrics) -> None:
        self._authority = authority
        self._settings = settings
        self._metrics = metrics
        # Settlements in flight: they outlive a stream that Envoy closes (client gone).
        self._tasks: set[asyncio.Task[None]] = set()

    async def Process(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        """Answer each message with "continue"; settle the hold when the response is known."""
        exchange = Exchange(
            self._settings.incomplete_response, self._settings.max_body_bytes, self._settings.prices
        )
        try:
            async for message in requests:
                kind = message.WhichOneof("request")
                settlement = self._observe(exchange, kind, message)
                if settlement is not None:
                    # Shielded: if Envoy drops the stream now, the settlement still completes.
                    await asyncio.shield(self._start(settlement))
                if kind in _CONTINUE and not message.observability_mode:
                    yield continue_response(kind)
        finally:
            # The stream ended before the response did (client gone, Envoy gave up).
            leftover = exchange.end()
            if leftover is not None:
                self._start(leftover)

    async def drain(self) -> None:
        """Wait for the settlements still in flight (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _observe(self, exchange: Exchange, kind: str | None, message: Any) -> Settlement | None:
        if kind == "request_headers":
            exchange.request_headers(header_values(message.request_headers.headers.headers))
        elif kind == "response_headers":
            part = message.response_headers
            return exchange.response_headers(
                header_values(part.headers.headers), part.end_of_stream
            )
        elif kind == "response_body":
            part = message.response_body
            return exchange.response_body(bytes(part.body), part.end_of_stream)
        elif kind == "response_trailers":
            return exchange.end()
        return None

    def _start(self, settlement: Settlement) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._settle(settlement))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle(self, settlement: Settlement) -> None:
        try:
            if settlement.spend is None:
                await self._authority.release(settlement.reservation_id)
                self._metrics.spends.inc(("released",))
                log.info("hold %s released: %s", settlement.reservation_id, settlement.why)
            else:
                await self._record(settlement.spend)
        except BudgetdError as exc:
            self._metrics.failure(exc)
            log.warning(
                "could not settle hold %s (%s): %s: %s",
                settlement.reservation_id,
                settlement.why,
                type(exc).__name__,
                exc,
            )
            self._metrics.spends.inc(("failed",))
        except Exception:
            log.exception("could not settle hold %s", settlement.reservation_id)
            self._metrics.spends.inc(("failed",))

    async def _record(self, spend: SpendRequest) -> None:
        started, result_id = time.perf_counter(), spend.request_id
        try:
            result = await self._authority.record(spend)
            reused = result.duplicate
        except FailedPrecondition:
            reused = True
        if reused:
            # Each hold is settled once, so a "duplicate" means another request reused this
            # x-request-id (clients can set it): record under an id of the hold itself
            # rather than let this request go uncharged.
            log.warning("x-request-id %r reused; recording by reservation", spend.request_id)
            result_id = spend_request_id("", spend.reservation_id)
            result = await self._authority.record(
                replace(
                    spend,
                    request_id=result_id,
                    metadata={**spend.metadata, "reused_request_id": spend.request_id},
                )
            )
        self._metrics.spend(result)
        request_log.spend("EnvoyProcess", result_id, result, time.perf_counter() - started)


def spend_request_id(x_request_id: str, reservation_id: str) -> str:
    """The ledger's request id: Envoy's ``x-request-id``, else one derived from the hold."""
    if x_request_id and len(x_request_id) <= MAX_TEXT and "\x00" not in x_request_id:
        return x_request_id
    digest = hashlib.sha256(reservation_id.encode()).hexdigest()[:32]
    return f"envoy-{digest}"


def _usd(value: str | None) -> float | None:
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        log.warning("ignoring an unreadable USD amount %.40r", value)
        return None
    if not math.isfinite(number) or not 0 <= number <= MAX_USD:
        log.warning("ignoring an impossible USD amount %.40r", value)
        return None
    return number


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0
