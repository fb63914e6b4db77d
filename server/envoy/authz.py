"""Envoy's gRPC external authorization: ``envoy.service.auth.v3.Authorization/Check``.

Envoy's ``envoy.filters.http.ext_authz`` filter asks this before every request. The key comes
from ``authorization: Bearer …`` or ``x-api-key``; with ``with_request_body`` set, the model,
``max_tokens`` and prompt size come from the OpenAI-style JSON body and size the hold.

* Allow: gRPC status OK in the CheckResponse, the ``x-budget-*`` headers set upstream (every
  other ``x-budget-*`` header and the header that carried the key removed, so neither a
  forged value nor the budgetd key reaches the upstream), and the same facts as dynamic
  metadata (namespace ``envoy.filters.http.ext_authz``) for access logs and later filters.
* Deny: ``denied_response`` with LiteLLM's JSON error body and the HTTP status from
  :mod:`server.denials` (``deny_status``, 400 by default; 401 for key problems; 429 with
  ``retry-after`` for rate limits). A body that is too large (413) or malformed (400) is
  refused the same way, before any budget question.
* budgetd cannot decide (a backend is down): the RPC fails with the gRPC status from the
  error table (UNAVAILABLE), so Envoy's ``failure_mode_allow`` / ``status_on_error`` decide.
  Never an allow by accident.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2 as auth_pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from server import answers, request_log
from server.authority import Authority, CheckRequest, Decision
from server.denials import (
    ALLOW_HEADERS,
    HEADER_RESERVATION_ID,
    HEADER_RESERVED,
    HttpDenial,
    RateHeaders,
    allow_headers,
    http_denial,
    http_error,
    split_credential,
)
from server.envoy.openai import BodyError, RequestFacts, parse_request
from server.envoy.wire import SetHeaderBytes, StructEntryBytes, header_values, set_headers
from server.errors import BudgetdError, grpc_code
from server.hot import HotAllow
from server.identity import bearer_token
from server.metrics import Metrics
from server.money import nanos_to_usd
from server.settings import Settings
from server.validation import MAX_TEXT
from server.wire_bytes import Field, HoldFields, length_delimited

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
# The parts of a hot allow's answer that are its own (AllowAnswers).
_OK = Field.of(auth_pb.CheckResponse, "ok_response")
_METADATA = Field.of(auth_pb.CheckResponse, "dynamic_metadata")
_HEADERS = Field.of(auth_pb.OkHttpResponse, "headers")
_SET_RESERVATION_ID = SetHeaderBytes(HEADER_RESERVATION_ID)
_SET_RESERVED = SetHeaderBytes(HEADER_RESERVED)
_RESERVATION_ID = StructEntryBytes("reservation_id")
_RESERVED_USD = StructEntryBytes("reserved_usd")
log = logging.getLogger("budgetd.envoy")
Context = grpc.aio.ServicerContext[Any, Any]


# xds-protos ships no type information, so its servicer base class is Any to mypy.
class EnvoyAuthorization(auth_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``Authorization/Check`` answered by the Authority, in LiteLLM's HTTP terms."""

    def __init__(self, authority: Authority, settings: Settings, metrics: Metrics) -> None:
        self._authority = authority
        self._settings = settings
        self._metrics = metrics
        self._allows = AllowAnswers()

    async def Check(self, request: Any, context: Context) -> Any:
        """One ext_authz question; a denial is a normal answer, an outage an error status."""
        http = request.attributes.request.http
        headers = request_headers(http)
        token, used = credential(headers)
        api_key, jwt = split_credential(token)
        body = bytes(http.raw_body) or http.body.encode()
        try:
            facts = parse_request(
                body, self._settings.max_body_bytes, headers.get("content-type", "")
            )
        except BodyError as exc:
            return _denied(http_error(exc.status, str(exc)), {"reason": "INVALID_REQUEST"})
        request_id = _request_id(headers.get("x-request-id", "") or http.id)
        started = time.perf_counter()
        # A busy key's allow without building the request (server.hot); else, in full.
        hot = self._authority.check_hot(
            api_key, facts.model, "", request_id, None, facts.max_tokens, facts.prompt_tokens
        )
        if hot is not None:
            seconds = time.perf_counter() - started
            self._metrics.latency.observe("EnvoyCheck", seconds)  # (one call less)
            self._metrics.hot_decision(hot.template)  # by outcome, reason and scope
            if request_log.decisions_logged():
                decision = answers.admitted(*hot)
                request_log.decision("EnvoyCheck", request_id, decision, seconds)
            return self._allows.hot(hot, facts, used)
        req = CheckRequest(
            api_key=api_key,
            model=facts.model,
            request_id=request_id,
            max_tokens=facts.max_tokens,
            prompt_tokens=facts.prompt_tokens,
            jwt=jwt,
        )
        try:
            decision = await self._authority.check(req)
        except BudgetdError as exc:
            self._metrics.observe_latency("EnvoyCheck", time.perf_counter() - started)
            log.warning("ext_authz cannot decide (%s): %s", type(exc).__name__, exc)
            self._metrics.failure(exc)
            await context.abort(grpc_code(exc), str(exc))
        seconds = time.perf_counter() - started
        self._metrics.observe_latency("EnvoyCheck", seconds)
        self._metrics.decision(decision)
        request_log.decision("EnvoyCheck", req.request_id, decision, seconds)
        if decision.allowed:
            return self._allows.convert(decision, facts, used)
        denial = http_denial(
            decision.reason.value,
            decision.message,
            decision.retry_after,
            deny_status=self._settings.deny_status,
            rate=_rate(decision),
        )
        return _denied(denial, _facts(decision))


def request_headers(http: Any) -> Mapping[str, str]:
    """The request's headers by lowercase name.

    Envoy sends ``headers`` with lowercase names (the AttributeContext contract): that map
    is read as it is, without a copy. With ``encode_raw_headers`` it sends ``header_map``
    instead, whose names are lowercased here (and win over ``headers`` should both come).
    """
    raw = http.header_map.headers
    if not raw:
        return http.headers  # type: ignore[no-any-return]
    merged = {name.lower(): value for name, value in http.headers.items()}
    merged.update(header_values(raw))
    return merged


def credential(headers: Mapping[str, str]) -> tuple[str, list[str]]:
    """The credential (``authorization: Bearer`` first, then ``x-api-key``: an API key or a
    JWT) and the headers that carry it (removed before the request goes upstream)."""
    bearer = bearer_token(headers.get("authorization"))
    api_key = (headers.get("x-api-key") or "").strip()
    key = bearer or api_key
    carriers = []
    if key and bearer == key:
        carriers.append("authorization")
    if key and api_key == key:
        carriers.append("x-api-key")
    return key, carriers


def _rate(decision: Decision) -> RateHeaders | None:
    rate = decision.rate
    return RateHeaders(rate.per_minute, rate.remaining, rate.reset_after) if rate else None


def _request_id(value: str) -> str:
    # Only a label at check time: an unusable one is dropped rather than failing the check.
    return value if len(value) <= MAX_TEXT and "\x00" not in value else ""


def _facts(decision: Decision) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "allowed": decision.allowed,
        "team_id": decision.team_id,
        "key_id": decision.key_id,
        "key_alias": decision.key_alias,
    }
    if decision.remaining_nanos is not None:
        facts["remaining_usd"] = nanos_to_usd(decision.remaining_nanos)
    if decision.allowed:
        facts["reservation_id"] = decision.reservation_id
        facts["reserved_usd"] = nanos_to_usd(decision.reserved_nanos)
    else:
        facts["reason"] = decision.reason.value
    return facts


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({name: value for name, value in values.items() if value not in ("", None)})
    return out


def _allowed(decision: Decision, facts: RequestFacts, used: list[str]) -> Any:
    remaining = None
    if decision.remaining_nanos is not None:
        remaining = nanos_to_usd(decision.remaining_nanos)
    upstream = allow_headers(
        decision.team_id,
        decision.key_alias,
        decision.reservation_id,
        remaining,
        reserved_usd=nanos_to_usd(decision.reserved_nanos),
        model=facts.model,
    )
    # The two values each answer has of its own go last: a hot answer appends them to its
    # template's bytes (AllowAnswers), and both must parse to the same message.
    for name in (HEADER_RESERVATION_ID, HEADER_RESERVED):
        if name in upstream:
            upstream[name] = upstream.pop(name)
    drop = used + [name for name in ALLOW_HEADERS if name not in upstream]
    metadata = _facts(decision)
    if facts.model:
        metadata["model"] = facts.model
    response = auth_pb.CheckResponse(
        ok_response=auth_pb.OkHttpResponse(headers=set_headers(upstream), headers_to_remove=drop),
        dynamic_metadata=_struct(metadata),
    )
    response.status.code = grpc.StatusCode.OK.value[0]
    return response


class AllowAnswers:
    """:func:`_allowed`, building the answer of a hot-path template once (server.hot).

    A hot-path allow differs from its template only in its reservation id and estimate.
    Per template, model and key-carrying headers the template's CheckResponse is
    serialised once without them; each answer is those bytes followed by its own two
    headers and two metadata values (:mod:`server.wire_bytes`), which parse to the message
    :func:`_allowed` builds (it puts those two headers last for that reason).
    """

    def __init__(self) -> None:
        # Per hold amount: its reserved header option and metadata entry.
        self._holds: HoldFields[tuple[bytes, bytes]] = HoldFields()

    def convert(self, decision: Decision, facts: RequestFacts, used: list[str]) -> Any:
        """The answer to send for an allow: a CheckResponse, or a hot allow's bytes."""
        template = decision.template
        if template is None:
            return _allowed(decision, facts, used)
        allow = HotAllow(template, decision.reservation_id, decision.reserved_nanos)
        return self.hot(allow, facts, used)

    def hot(self, allow: HotAllow, facts: RequestFacts, used: list[str]) -> bytes:
        """The serialised CheckResponse of a hot-path allow: its template's, then its hold."""
        template = allow.template
        form = ("envoy", facts.model, tuple(used))
        base = template.forms.get(form)
        if base is None:
            base = template.forms[form] = _without_hold(_allowed(template, facts, used))
        hold = self._holds.get(allow.reserved_nanos)
        if hold is None:
            hold = self._hold(allow.reserved_nanos)
        # budgetd's own ids are base64url, digits and dots: nothing for set_headers'
        # header_text to strip.
        reservation_id = allow.reservation_id.encode()
        headers = length_delimited(_HEADERS.key, _SET_RESERVATION_ID(reservation_id)) + hold[0]
        metadata = hold[1]
        if reservation_id:  # (_struct leaves empty values out)
            metadata = _RESERVATION_ID.string(reservation_id) + metadata
        return b"".join(
            (base, length_delimited(_OK.key, headers), length_delimited(_METADATA.key, metadata))
        )

    def _hold(self, nanos: int) -> tuple[bytes, bytes]:
        """The serialised reserved header option and metadata entry of a hold of ``nanos``."""
        reserved = nanos_to_usd(nanos)
        # A float's repr is plain ASCII: nothing for header_text to strip either.
        header = length_delimited(_HEADERS.key, _SET_RESERVED(repr(reserved).encode()))
        return self._holds.keep(nanos, (header, _RESERVED_USD.number(reserved)))


def _without_hold(response: Any) -> bytes:
    """A hot template's serialised answer without the values each answer has of its own."""
    headers = response.ok_response.headers
    for index in reversed(range(len(headers))):
        if headers[index].header.key in (HEADER_RESERVATION_ID, HEADER_RESERVED):
            del headers[index]
    fields = response.dynamic_metadata.fields
    for name in ("reservation_id", "reserved_usd"):
        if name in fields:
            del fields[name]
    return response.SerializeToString()  # type: ignore[no-any-return]


def _denied(denial: HttpDenial, metadata: dict[str, Any]) -> Any:
    headers = {"content-type": "application/json", **denial.headers}
    response = auth_pb.CheckResponse(
        denied_response=auth_pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=denial.status),
            headers=set_headers(headers),
            body=json.dumps(denial.body),
        ),
        dynamic_metadata=_struct(metadata),
    )
    # Any non-OK code denies; the HTTP status above is what the client sees.
    code = (
        grpc.StatusCode.UNAUTHENTICATED
        if denial.status == 401
        else grpc.StatusCode.PERMISSION_DENIED
    )
    response.status.code = code.value[0]
    response.status.message = str(denial.body["error"]["message"])
    return response
