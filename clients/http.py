"""HTTP plumbing shared by the bridge's endpoints: LiteLLM-style errors, bounded JSON bodies.

Every error the bridge answers has LiteLLM's shape,
``{"error": {"message": ..., "type": ..., "param": null, "code": <status>}}``, so clients of
a LiteLLM proxy parse it unchanged. gRPC failures are mapped through budgetd's one error
table (:func:`server.errors.http_status_for_code`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from aiohttp import web

from clients.grpc_client import RpcError
from server.errors import http_status_for_code

log = logging.getLogger("budgetd.bridge")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The error "type" for the statuses the bridge answers with: LiteLLM's for auth and lookups,
# OpenAI's invalid_request_error for bad input (as Envoy's ext_authz in the server answers).
_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "auth_error",
    403: "auth_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class HttpError(Exception):
    """An error answer: HTTP status and message (rendered as LiteLLM's JSON error)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    @property
    def body(self) -> dict[str, Any]:
        """LiteLLM's error body for this error."""
        return error_body(self.status, self.message, param=self.param)


def error_type(status: int) -> str:
    """LiteLLM's error ``type`` for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "internal_server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, *, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as LiteLLM's proxy answers."""
    return {
        "error": {"message": message, "type": error_type(status), "param": param, "code": status}
    }


def json_response(
    data: Mapping[str, Any] | list[Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON answer (an object, or a list as LiteLLM's listings); ``json.dumps`` defaults
    give the seed's spacing (``{"a": 1}``)."""
    return web.Response(
        text=json.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def from_rpc_error(error: RpcError) -> HttpError:
    """The HTTP form of a failed budgetd call: unreachable → 503, else the error table."""
    if error.unreachable:
        return HttpError(
            HTTPStatus.SERVICE_UNAVAILABLE,
            f"budgetd is unavailable at {error.target} ({error.code.name}: "
            f"{error.details or 'no answer'}); try again later",
        )
    return HttpError(int(http_status_for_code(error.code)), error.details or error.code.name)


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The request body, refusing one over ``max_bytes`` with 413 (without reading it all)."""
    too_large = HttpError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"request body is larger than the limit of {max_bytes} bytes (budgetd.max_body_bytes)",
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        # The application's client_max_size is max_bytes: aiohttp stops reading past it.
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 that names what is wrong with it."""
    if not raw.strip():
        raise HttpError(HTTPStatus.BAD_REQUEST, "request body is empty: expected a JSON object")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "request body is not UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}",
        ) from None
    if not isinstance(data, dict):
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"request body must be a JSON object, not {type(data).__name__}",
        )
    return data


async def read_json_object(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (413 over ``max_bytes``, 400 when malformed)."""
    return parse_json_object(await read_body(request, max_bytes))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as LiteLLM's JSON error, so no caller sees an HTML error page."""
    try:
        return await handler(request)
    except HttpError as exc:
        return json_response(exc.body, exc.status, exc.headers)
    except RpcError as exc:
        error = from_rpc_error(exc)
        if error.status >= 500:
            log.warning("%s %s: budgetd call failed: %s", request.method, request.path, exc)
        return json_response(error.body, error.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 405 else f"{request.method} is not allowed here"
        if exc.status == 404:
            message = f"no such endpoint: {request.method} {request.path}"
        return json_response(error_body(exc.status, message), exc.status)
    except Exception:
        log.exception("%s %s: unexpected error", request.method, request.path)
        status = HTTPStatus.INTERNAL_SERVER_ERROR
        return json_response(error_body(status, "internal error in the budgetd bridge"), status)
