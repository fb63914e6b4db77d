"""The auth endpoints gateways call before each request: Envoy, nginx and Traefik.

Each asks budgetd's CheckBudget with the request's API key (``Authorization: Bearer`` or
``x-api-key``) and, when the gateway sends the body, its model, ``max_tokens`` and prompt
size. An allowed request is answered 200 with the ``x-budget-*`` headers the gateway copies
upstream; a denial is answered as each gateway needs it:

* ``/envoy/authz/*`` (Envoy's HTTP ext_authz): the denial's status, headers and LiteLLM's
  JSON body, which Envoy returns to the client as they are.
* ``/nginx/auth`` (nginx ``auth_request``): nginx passes on only 401 and 403 (anything else
  is a 500), so credential problems are 401 and every other denial is 403, with the real
  status in ``x-budget-status``, the message in ``x-budget-message`` and the whole JSON body
  in ``x-budget-error``, for nginx's ``error_page`` to turn back into LiteLLM's answer.
* ``/traefik/auth`` (Traefik ``forwardAuth``): like Envoy; Traefik returns a non-2xx answer
  to the client unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from clients.grpc_client import BudgetdClient, RpcError, pb
from clients.http import HttpError, from_rpc_error, json_response, read_body
from server.denials import (
    ALLOW_HEADERS,
    HEADER_MESSAGE,
    HEADER_STATUS,
    RateHeaders,
    allow_headers,
    http_denial,
    split_credential,
)
from server.envoy.authz import credential as key_and_carriers
from server.envoy.openai import BodyError, RequestFacts, parse_request

log = logging.getLogger("budgetd.bridge")

HEADER_ERROR: Final = "x-budget-error"
"""nginx only: a denial's whole LiteLLM JSON body, for ``error_page`` to answer with."""

# Envoy's HTTP ext_authz removes the request headers named here before going upstream: the
# budget key is budgetd's credential, not the upstream's (as in the gRPC ext_authz mode).
ENVOY_HEADERS_TO_REMOVE: Final = "x-envoy-auth-headers-to-remove"
# Envoy sets this when it sent only the first max_request_bytes of the body.
ENVOY_PARTIAL_BODY: Final = "x-envoy-auth-partial-body"

NO_KEY_MESSAGE: Final = "No API key passed in the request."
_MAX_REQUEST_ID: Final = 256


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision as HTTP: 200 plus upstream headers, or the denial's status, headers, body."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        return self.status == HTTPStatus.OK


class GatewayAuth:
    """The handlers of ``/envoy/authz/*``, ``/nginx/auth`` and ``/traefik/auth``."""

    def __init__(self, client: BudgetdClient, *, deny_status: int, max_body_bytes: int) -> None:
        self._client = client
        self._deny_status = deny_status
        self._max_body_bytes = max_body_bytes

    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the bridge's application."""
        return [
            web.route("*", "/envoy/authz", self.envoy),
            web.route("*", "/envoy/authz/{tail:.*}", self.envoy),
            web.route("*", "/nginx/auth", self.nginx),
            web.route("*", "/traefik/auth", self.traefik),
        ]

    async def envoy(self, request: web.Request) -> web.Response:
        """Envoy HTTP ext_authz: 200 allows; anything else is the client's answer."""
        partial = request.headers.get(ENVOY_PARTIAL_BODY, "").lower() == "true"
        verdict = await self.decide(request, with_body=True, partial_body=partial)
        if verdict.allowed:
            # Neither the budgetd key nor a client's own x-budget-* value reaches upstream.
            _, carriers = key_and_carriers(_lower_headers(request))
            unset = [name for name in ALLOW_HEADERS if name not in verdict.headers]
            verdict.headers[ENVOY_HEADERS_TO_REMOVE] = ",".join(carriers + unset)
        return _render(verdict)

    async def traefik(self, request: web.Request) -> web.Response:
        """Traefik forwardAuth: 2xx allows; anything else goes to the client unchanged."""
        return _render(await self.decide(request, with_body=True))

    async def nginx(self, request: web.Request) -> web.Response:
        """nginx auth_request: 2xx allows, 401 and 403 deny (see the module docstring)."""
        try:
            verdict = await self.decide(request, with_body=False)
        except HttpError as exc:
            verdict = Verdict(exc.status, exc.headers, exc.body)
        if verdict.allowed:
            return _render(verdict)
        status = verdict.status
        headers = dict(verdict.headers)
        headers[HEADER_STATUS] = str(status)
        if verdict.body is not None:
            message = str(verdict.body.get("error", {}).get("message", ""))
            headers[HEADER_MESSAGE] = _header_safe(message)
            # ensure_ascii: a header value must be printable ASCII.
            headers[HEADER_ERROR] = json.dumps(verdict.body, ensure_ascii=True)
        # nginx turns any status but 2xx/401/403 into a 500, losing the answer: so every
        # refusal is a 403 (the real status is in x-budget-status); 5xx stay errors.
        if status not in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) and status < 500:
            status = HTTPStatus.FORBIDDEN
        return json_response(verdict.body or {}, status, headers)

    async def decide(
        self, request: web.Request, *, with_body: bool, partial_body: bool = False
    ) -> Verdict:
        """Ask budgetd about this request; HttpError when it cannot be asked or answered."""
        # A missing key is asked about too: budgetd answers KEY_INVALID and counts it.
        token, _ = credential(request)
        facts = await self._facts(request, partial_body) if with_body else RequestFacts()
        api_key, jwt = split_credential(token or "")
        check = pb.CheckBudgetRequest(
            model=facts.model,
            request_id=_request_id(request),
            max_tokens=facts.max_tokens,
            prompt_tokens=facts.prompt_tokens,
        )
        if jwt:
            check.jwt = jwt
        else:
            check.api_key = api_key
        try:
            answer = await self._client.check_budget(check)
        except RpcError as exc:
            raise from_rpc_error(exc) from None
        if answer.allowed:
            remaining = answer.remaining if answer.HasField("remaining") else None
            headers = allow_headers(
                answer.team_id,
                answer.key_alias,
                answer.reservation_id,
                remaining,
                reserved_usd=answer.reserved,
                model=facts.model,
            )
            return Verdict(HTTPStatus.OK, headers)
        retry_after = answer.retry_after if answer.HasField("retry_after") else None
        reason = pb.Reason.Name(answer.reason)
        log.debug(
            "denied %s %s: %s %s", request.method, _original_uri(request), reason, answer.message
        )
        rate = None
        if answer.HasField("ratelimit_limit"):
            rate = RateHeaders(
                answer.ratelimit_limit, answer.ratelimit_remaining, answer.ratelimit_reset
            )
        return _denied(reason, answer.message, retry_after, self._deny_status, rate)

    async def _facts(self, request: web.Request, partial_body: bool) -> RequestFacts:
        """Model, max_tokens and prompt size from the forwarded body (same rules as Envoy's
        gRPC ext_authz: a non-JSON content type gives no facts, malformed JSON is a 400)."""
        raw = await read_body(request, self._max_body_bytes)
        content_type = request.headers.get("content-type", "")
        # Gateways do not always forward Content-Type to the auth service: without one, only
        # a body that looks like JSON is read as a request.
        if not content_type and raw.lstrip()[:1] not in (b"{", b"["):
            return RequestFacts()
        try:
            return parse_request(raw, self._max_body_bytes, content_type)
        except BodyError as exc:
            if partial_body:  # Envoy sent only the start of the body: it cannot parse
                return RequestFacts()
            raise HttpError(exc.status, str(exc)) from None


def credential(request: web.Request) -> tuple[str | None, str | None]:
    """The credential of a request (``Authorization: Bearer`` first, then ``x-api-key``; an
    API key or a JWT) and the header that carried it; ``(None, None)`` without one."""
    key, carriers = key_and_carriers(_lower_headers(request))
    return (key, carriers[0]) if key else (None, None)


def _lower_headers(request: web.Request) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers.items()}


def _denied(
    reason: str,
    message: str,
    retry_after: float | None,
    deny_status: int,
    rate: RateHeaders | None = None,
) -> Verdict:
    denial = http_denial(reason, message, retry_after, deny_status=deny_status, rate=rate)
    return Verdict(denial.status, dict(denial.headers), denial.body)


def _render(verdict: Verdict) -> web.Response:
    if verdict.allowed:
        return web.Response(status=verdict.status, headers=verdict.headers)
    return json_response(verdict.body or {}, verdict.status, verdict.headers)


def _request_id(request: web.Request) -> str:
    value = request.headers.get("x-request-id", "").strip()
    return value if len(value) <= _MAX_REQUEST_ID else ""


def _original_uri(request: web.Request) -> str:
    """The gateway's original request URI (for logs): from the path or forwarded headers."""
    tail = request.match_info.get("tail")
    if tail is not None:
        return "/" + tail
    for header in ("x-original-uri", "x-forwarded-uri"):
        if header in request.headers:
            return request.headers[header]
    return request.path


def _header_safe(text: str) -> str:
    """``text`` as a printable-ASCII header value (no line breaks, non-ASCII escaped)."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(ch if " " <= ch <= "~" else " " for ch in escaped)
