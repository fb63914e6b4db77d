"""A typed asyncio client for budgetd.v1.BudgetAuthority over one keep-alive gRPC channel.

Every call has a bounded deadline, so a budgetd that hangs is reported as quickly as one that
is down. Failures come out as :class:`RpcError`, which keeps the gRPC status code so callers
(the HTTP bridge) can map it through budgetd's one error table.

    async with BudgetdClient("127.0.0.1:50051") as client:
        team = await client.create_team(
            pb.CreateTeamRequest(team_alias="QA Prod Bot", max_budget=1e-9),
            authorization="Bearer sk-1234",
        )
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc

__all__ = ["ADMIN_TIMEOUT", "DECISION_TIMEOUT", "BudgetdClient", "RpcError", "pb"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")

DECISION_TIMEOUT: Final = 2.0
"""Seconds a CheckBudget/RecordSpend may take: it sits on a request's critical path."""

ADMIN_TIMEOUT: Final = 10.0
"""Seconds an admin call may take (these write to the database)."""

SERVICE_NAME: Final = "budgetd.v1.BudgetAuthority"

_UNREACHABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

CHANNEL_OPTIONS: Final[tuple[tuple[str, Any], ...]] = (
    # Ping an idle connection so a dead peer (restarted host, dropped NAT entry) is noticed
    # before a request needs it. 310 s stays above gRPC servers' default minimum ping interval
    # (300 s); pinging more often makes a default server close the connection (too_many_pings).
    ("grpc.keepalive_time_ms", 310_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly once budgetd is back: the default backoff grows to two minutes, which
    # would keep answering 503 long after budgetd has restarted.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # No retry policy: a CheckBudget places a hold, so it is never re-sent once it may have
    # reached budgetd. gRPC's transparent retries (of calls that never left this process, as
    # when budgetd restarts) stay on.
)


class RpcError(Exception):
    """A budgetd call that failed: its gRPC status code and details, and the target."""

    def __init__(self, code: grpc.StatusCode, details: str, target: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.target = target

    @property
    def unreachable(self) -> bool:
        """True when budgetd did not answer (down, unreachable or too slow)."""
        return self.code in _UNREACHABLE


class BudgetdClient:
    """budgetd's RPCs as typed coroutines over one shared channel (open it before use).

    Admin calls take ``authorization`` (``"Bearer <master key>"``) and forward it as gRPC
    metadata; the client holds no credentials of its own.
    """

    def __init__(
        self,
        target: str,
        *,
        decision_timeout: float = DECISION_TIMEOUT,
        admin_timeout: float = ADMIN_TIMEOUT,
    ) -> None:
        self.target = target
        self.decision_timeout = decision_timeout
        self.admin_timeout = admin_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.BudgetAuthorityAsyncStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    async def open(self) -> None:
        """Create the channel (it connects lazily, on the first call)."""
        if self._channel is None:
            channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._channel = channel
            # The async stub type exists only in the .pyi: on an aio channel the plain stub
            # is that async stub.
            self._stub = pb_grpc.BudgetAuthorityStub(channel)
            self._health = health_pb2_grpc.HealthStub(channel)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        channel, self._channel, self._stub, self._health = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def stub(self) -> pb_grpc.BudgetAuthorityAsyncStub:
        """The underlying stub (raises if the client is not open)."""
        if self._stub is None:
            raise RuntimeError("BudgetdClient is not open: call open() or use `async with`")
        return self._stub

    # -- decision path ---------------------------------------------------------------------

    async def check_budget(self, request: pb.CheckBudgetRequest) -> pb.CheckBudgetResponse:
        """May this key spend now? A denial is an answer (``allowed`` false), not an error."""
        return await self._call(self.stub.CheckBudget, request, self.decision_timeout)

    async def record_spend(self, request: pb.RecordSpendRequest) -> pb.RecordSpendResponse:
        """Record what a request cost (idempotent on ``request_id``)."""
        return await self._call(self.stub.RecordSpend, request, self.decision_timeout)

    # -- admin path ------------------------------------------------------------------------

    async def create_team(
        self, request: pb.CreateTeamRequest, *, authorization: str | None
    ) -> pb.Team:
        """CreateTeam with the caller's ``authorization``."""
        return await self._admin(self.stub.CreateTeam, request, authorization)

    async def get_team(self, request: pb.GetTeamRequest, *, authorization: str | None) -> pb.Team:
        """GetTeam with the caller's ``authorization``."""
        return await self._admin(self.stub.GetTeam, request, authorization)

    async def list_teams(
        self, request: pb.ListTeamsRequest, *, authorization: str | None
    ) -> pb.ListTeamsResponse:
        """ListTeams with the caller's ``authorization``."""
        return await self._admin(self.stub.ListTeams, request, authorization)

    async def update_team(
        self, request: pb.UpdateTeamRequest, *, authorization: str | None
    ) -> pb.Team:
        """UpdateTeam with the caller's ``authorization``."""
        return await self._admin(self.stub.UpdateTeam, request, authorization)

    async def issue_key(
        self, request: pb.IssueKeyRequest, *, authorization: str | None
    ) -> pb.IssueKeyResponse:
        """IssueKey with the caller's ``authorization`` (the plaintext key is in this answer)."""
        return await self._admin(self.stub.IssueKey, request, authorization)

    async def get_key(self, request: pb.GetKeyRequest, *, authorization: str | None) -> pb.Key:
        """GetKey with the caller's ``authorization``."""
        return await self._admin(self.stub.GetKey, request, authorization)

    async def revoke_key(
        self, request: pb.RevokeKeyRequest, *, authorization: str | None
    ) -> pb.Key:
        """RevokeKey with the caller's ``authorization``."""
        return await self._admin(self.stub.RevokeKey, request, authorization)

    async def list_keys(
        self, request: pb.ListKeysRequest, *, authorization: str | None
    ) -> pb.ListKeysResponse:
        """ListKeys with the caller's ``authorization``."""
        return await self._admin(self.stub.ListKeys, request, authorization)

    async def get_spend(
        self, request: pb.GetSpendRequest, *, authorization: str | None
    ) -> pb.GetSpendResponse:
        """GetSpend (a spend report from the ledger) with the caller's ``authorization``."""
        return await self._admin(self.stub.GetSpend, request, authorization)

    async def add_team_member(
        self, request: pb.TeamMemberRequest, *, authorization: str | None
    ) -> pb.TeamMember:
        """AddTeamMember with the caller's ``authorization`` (ALREADY_EXISTS for a member)."""
        return await self._admin(self.stub.AddTeamMember, request, authorization)

    async def update_team_member(
        self, request: pb.TeamMemberRequest, *, authorization: str | None
    ) -> pb.TeamMember:
        """UpdateTeamMember with the caller's ``authorization`` (NOT_FOUND for a non-member)."""
        return await self._admin(self.stub.UpdateTeamMember, request, authorization)

    async def remove_team_member(
        self, request: pb.RemoveTeamMemberRequest, *, authorization: str | None
    ) -> pb.TeamMember:
        """RemoveTeamMember with the caller's ``authorization``; answers the removed member."""
        return await self._admin(self.stub.RemoveTeamMember, request, authorization)

    async def list_team_members(
        self, request: pb.ListTeamMembersRequest, *, authorization: str | None
    ) -> pb.ListTeamMembersResponse:
        """ListTeamMembers with the caller's ``authorization``."""
        return await self._admin(self.stub.ListTeamMembers, request, authorization)

    async def block_team(self, request: pb.GetTeamRequest, *, authorization: str | None) -> pb.Team:
        """BlockTeam (its requests are denied with TEAM_BLOCKED) with ``authorization``."""
        return await self._admin(self.stub.BlockTeam, request, authorization)

    async def unblock_team(
        self, request: pb.GetTeamRequest, *, authorization: str | None
    ) -> pb.Team:
        """UnblockTeam with the caller's ``authorization``."""
        return await self._admin(self.stub.UnblockTeam, request, authorization)

    async def block_key(self, request: pb.GetKeyRequest, *, authorization: str | None) -> pb.Key:
        """BlockKey (its requests are denied with KEY_BLOCKED) with ``authorization``."""
        return await self._admin(self.stub.BlockKey, request, authorization)

    async def unblock_key(self, request: pb.GetKeyRequest, *, authorization: str | None) -> pb.Key:
        """UnblockKey with the caller's ``authorization``."""
        return await self._admin(self.stub.UnblockKey, request, authorization)

    # -- health ----------------------------------------------------------------------------

    async def serving(self) -> bool:
        """True when budgetd answers its health check with SERVING."""
        if self._health is None:
            raise RuntimeError("BudgetdClient is not open: call open() or use `async with`")
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        try:
            answer = await self._health.Check(request, timeout=self.decision_timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    # -- plumbing --------------------------------------------------------------------------

    async def _admin(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Req,
        authorization: str | None,
    ) -> Resp:
        metadata = (("authorization", authorization),) if authorization else ()
        return await self._call(method, request, self.admin_timeout, metadata)

    async def _call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Req,
        deadline: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Resp:
        # deadline is gRPC's per-call timeout, enforced by the channel (and sent to budgetd).
        try:
            return await method(request, timeout=deadline, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise RpcError(exc.code(), exc.details() or "", self.target) from None
