"""The faces' hot lane: a busy key's CheckBudget (gRPC) or Envoy Check is answered straight
off the wire (``Authority.check_hot``), without the request and decision objects of the full
path, and the answer, its metrics and its log line are the ones the full path gives."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from google.protobuf import json_format

from envoy_messages import CHAT, PRICES, check_request, upstream_headers
from harness import ADMIN, make_settings
from server.app import BudgetdServer, Stores
from server.authority import Authority, CheckRequest, Decision
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.gen.budgetd.v1 import budgetd_pb2_grpc as pb_grpc
from server.storage.cached_records import CachedRecords
from server.storage.leasing import LeasingCounters
from server.storage.memory_counters import MemoryCounters
from server.storage.sqlite import SqliteRecords

ESTIMATE = 1e-6


@dataclass
class Hot:
    server: BudgetdServer
    stub: Any
    authz: Any
    counters: LeasingCounters
    key: str
    full_checks: list[CheckRequest]  # every request that took Authority.check (the full path)

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.server.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def hot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hot]:
    """budgetd with the record cache and leases (as with Redis), leasing from the first
    request, and a team with a large budget and one key."""
    settings = make_settings(tmp_path, prices=PRICES)
    sqlite = SqliteRecords(tmp_path / "budgetd.sqlite3")
    records = CachedRecords(sqlite, ttl=60.0, serve_stale=False)
    counters = LeasingCounters(MemoryCounters(), lease_seconds=60.0, hot_requests=1)
    server = BudgetdServer(settings, stores=Stores(records, counters, "test"))
    port = await server.start()
    full_checks: list[CheckRequest] = []
    check = Authority.check

    async def counted(self: Authority, req: CheckRequest) -> Decision:
        full_checks.append(req)
        return await check(self, req)

    monkeypatch.setattr(Authority, "check", counted)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.BudgetAuthorityStub(channel)
        team = await stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="t", max_budget=100.0, budget_duration="1d"),
            metadata=ADMIN,
        )
        key = await stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
        authz = auth_grpc.AuthorizationStub(channel)
        yield Hot(server, stub, authz, counters, key.key, full_checks)
    finally:
        await channel.close()
        await server.stop(grace=1.0)


def check(h: Hot, **fields: Any) -> Awaitable[Any]:
    request = pb.CheckBudgetRequest(api_key=h.key, model="llama3", estimated_cost=ESTIMATE)
    for name, value in fields.items():
        setattr(request, name, value)
    return h.stub.CheckBudget(request)  # type: ignore[no-any-return]


def without_reservation(answer: pb.CheckBudgetResponse) -> dict[str, Any]:
    fields = json_format.MessageToDict(answer)
    assert fields.pop("reservationId").startswith("r3.")
    return fields


async def warm(h: Hot, call: Callable[[], Awaitable[Any]]) -> Any:
    """Enough full-path answers for a lease and a hot entry, then one hot answer; returns
    the last full-path answer (the one the hot entry was derived from)."""
    for _ in range(3):
        last = await call()
    full = len(h.full_checks)
    await call()
    assert len(h.full_checks) == full, "the key should be answered by the hot lane by now"
    h.full_checks.clear()
    return last


async def test_hot_grpc_answers_are_the_full_paths(hot: Hot) -> None:
    first = await warm(hot, lambda: check(hot, request_id="a"))
    admits = hot.counters.local_admits
    answers = [await check(hot, request_id=f"r{i}") for i in range(5)]
    assert not hot.full_checks  # none of them built a CheckRequest
    assert hot.counters.local_admits == admits + 5  # each held its estimate on the lease
    ids = {answer.reservation_id for answer in answers} | {first.reservation_id}
    assert len(ids) == 6  # each its own
    assert all(without_reservation(answer) == without_reservation(first) for answer in answers)
    assert answers[0].reserved == ESTIMATE and answers[0].allowed

    # Each hot hold settles like any other.
    spent = await hot.stub.RecordSpend(
        pb.RecordSpendRequest(request_id="s1", reservation_id=answers[0].reservation_id, cost=2e-6)
    )
    assert spent.team_spend == 2e-6 and not spent.duplicate


async def test_invalid_requests_of_a_hot_key_get_the_full_paths_error(hot: Hot) -> None:
    await warm(hot, lambda: check(hot))
    admits = hot.counters.local_admits
    bad: list[tuple[dict[str, Any], str]] = [
        ({"estimated_cost": -1.0}, "estimated_cost"),
        ({"request_id": "x" * 10_000}, "request_id"),
    ]
    for fields, named in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(hot, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named in (err.value.details() or "")
    assert len(hot.full_checks) == 2  # the invalid ones went to the full path
    assert hot.counters.local_admits == admits  # and held nothing


async def test_hot_answers_are_counted_timed_and_logged(
    hot: Hot, caplog: pytest.LogCaptureFixture
) -> None:
    await warm(hot, lambda: check(hot))
    caplog.set_level(logging.INFO, logger="budgetd.requests")
    allowed = {"outcome": "allowed", "reason": "REASON_UNSPECIFIED", "scope": "team"}
    before = hot.sample("budgetd_decisions_total", allowed)
    timed = hot.sample("budgetd_rpc_duration_seconds_count", {"method": "CheckBudget"})
    answer = await check(hot, request_id="logged-1")
    assert not hot.full_checks
    assert hot.sample("budgetd_decisions_total", allowed) == before + 1
    assert hot.sample("budgetd_rpc_duration_seconds_count", {"method": "CheckBudget"}) == timed + 1
    lines = [r for r in caplog.records if r.name == "budgetd.requests"]
    assert len(lines) == 1
    line = lines[0].__dict__
    assert line["rpc"] == "CheckBudget" and line["request_id"] == "logged-1"
    assert line["decision"] == "allowed" and line["reserved_usd"] == answer.reserved
    assert line["team_id"] == answer.team_id and line["key_id"] == answer.key_id


async def test_hot_envoy_answers_are_the_full_paths(hot: Hot) -> None:
    body = json.dumps(CHAT | {"max_tokens": 10}).encode()

    def envoy_check(request_id: str) -> Awaitable[Any]:
        headers = {"authorization": f"Bearer {hot.key}", "x-request-id": request_id}
        return hot.authz.Check(check_request(headers, body))  # type: ignore[no-any-return]

    first = await warm(hot, lambda: envoy_check("e0"))
    answer = await envoy_check("e1")
    assert not hot.full_checks
    assert answer.status.code == 0 and first.status.code == 0

    def shape(response: Any) -> tuple[dict[str, str], list[str], dict[str, Any]]:
        headers = upstream_headers(response)
        reservation = headers.pop("x-budget-reservation-id")
        metadata = dict(response.dynamic_metadata)
        assert metadata.pop("reservation_id") == reservation and reservation.startswith("r3.")
        return headers, sorted(response.ok_response.headers_to_remove), metadata

    assert shape(answer) == shape(first)
    # 10 completion tokens at 2e-7 and the one prompt token "hi" makes, at 1e-7.
    assert upstream_headers(answer)["x-budget-reserved-usd"] == "2.1e-06"
    assert upstream_headers(answer) != upstream_headers(first)  # its own reservation


async def test_each_hot_answer_holds_its_own_estimate(hot: Hot) -> None:
    await warm(hot, lambda: check(hot))
    admits = hot.counters.local_admits
    # The entry remembers the last sizing it priced; a different one is priced afresh.
    for cost in (1e-6, 2.5e-6, 2.5e-6, 0.0, 1e-6):
        answer = await check(hot, estimated_cost=cost)
        assert answer.allowed and answer.reserved == cost
    tokens = await check(hot, max_tokens=10, prompt_tokens=15, estimated_cost=0.0)
    assert tokens.reserved == 0.0  # estimated_cost wins over tokens, as on the full path
    request = pb.CheckBudgetRequest(api_key=hot.key, model="llama3", max_tokens=10)
    priced = await hot.stub.CheckBudget(request)
    assert priced.reserved == 2e-6  # 10 completion tokens of llama3 at 2e-7
    assert not hot.full_checks and hot.counters.local_admits == admits + 7
