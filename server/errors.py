"""budgetd's domain errors and the one table that maps them to gRPC codes and HTTP statuses.

A denial (over budget, bad key) is not an error: it is a normal answer with allowed=false.
These are for requests budgetd cannot answer as asked.
"""

from __future__ import annotations

from http import HTTPStatus

import grpc


class BudgetdError(Exception):
    """Base of every error budgetd reports to a caller; the message is shown to the caller."""


class InvalidArgument(BudgetdError):
    """Bad input: negative/NaN cost, unknown duration, empty or oversized fields."""


class Unauthenticated(BudgetdError):
    """An admin call without the master key, or no master key configured."""


class NotFound(BudgetdError):
    """The team, key or reservation does not exist."""


class AlreadyExists(BudgetdError):
    """A team or key with that id exists already."""


class FailedPrecondition(BudgetdError):
    """The request conflicts with what is recorded (same request_id, different cost)."""


class Unavailable(BudgetdError):
    """A backend is down and policy says not to answer from what is left.

    UNAVAILABLE rather than UNKNOWN or INTERNAL: gateways (Envoy's ext_authz
    ``failure_mode_allow``, gRPC retry policies) treat it as a transient outage, and it is
    never mistaken for an allow.
    """


class RecordsUnavailable(Unavailable):
    """The record store (Postgres: teams, keys, the ledger) is unreachable.

    A kind of :class:`Unavailable` (so UNAVAILABLE on the wire), told apart so the decision
    path can carry on without the source of truth where policy allows (``postgres_down:
    spool``): from cached records and the counters, spooling acknowledged spend to disk.
    """


class ConfigError(BudgetdError):
    """The configuration cannot be used; the message names the key and the file."""


# The one table: domain error -> (gRPC status code, HTTP status).
ERROR_TABLE: dict[type[BudgetdError], tuple[grpc.StatusCode, HTTPStatus]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, HTTPStatus.BAD_REQUEST),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, HTTPStatus.UNAUTHORIZED),
    NotFound: (grpc.StatusCode.NOT_FOUND, HTTPStatus.NOT_FOUND),
    AlreadyExists: (grpc.StatusCode.ALREADY_EXISTS, HTTPStatus.CONFLICT),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.CONFLICT),
    Unavailable: (grpc.StatusCode.UNAVAILABLE, HTTPStatus.SERVICE_UNAVAILABLE),
    ConfigError: (grpc.StatusCode.FAILED_PRECONDITION, HTTPStatus.INTERNAL_SERVER_ERROR),
}


def grpc_code(error: BudgetdError) -> grpc.StatusCode:
    """The gRPC status code for a domain error."""
    return _lookup(error)[0]


def http_status(error: BudgetdError) -> HTTPStatus:
    """The HTTP status for a domain error (used by the bridge)."""
    return _lookup(error)[1]


def _lookup(error: BudgetdError) -> tuple[grpc.StatusCode, HTTPStatus]:
    for cls in type(error).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return grpc.StatusCode.INTERNAL, HTTPStatus.INTERNAL_SERVER_ERROR


def http_status_for_code(code: grpc.StatusCode) -> HTTPStatus:
    """The HTTP status for a gRPC status received from budgetd (used by the bridge).

    Read from the same table: the first domain error with ``code`` decides, so
    FAILED_PRECONDITION is a 409 conflict. DEADLINE_EXCEEDED means budgetd did not answer
    in time, which a caller handles like UNAVAILABLE: 503, try again later.
    """
    for grpc_status, status in ERROR_TABLE.values():
        if grpc_status == code:
            return status
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return HTTPStatus.SERVICE_UNAVAILABLE
    return HTTPStatus.INTERNAL_SERVER_ERROR
