"""Envoy's ext_authz Check and ext_proc Process over real gRPC, with synthetic Envoy messages.

The messages are shaped as Envoy 1.40 sends them (see tests/envoy_messages.py), against an
in-process budgetd; tests/test_envoy_e2e.py runs the real Envoy binary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from envoy_messages import (
    CHAT,
    JSON,
    SEED_BODY,
    SEED_COST,
    SSE,
    STREAM,
    USAGE,
    Budgetd,
    Exchange,
    body_message,
    check_request,
    denied_headers,
    eventually,
    headers_message,
    serve,
    upstream_headers,
)
from server.envoy.ext_proc import spend_request_id
from services import RedisServer


@pytest.fixture
async def budgetd(tmp_path: Path) -> AsyncIterator[Budgetd]:
    async with serve(tmp_path) as served:
        yield served


# -- ext_authz ---------------------------------------------------------------------------


async def test_allow_sets_budget_headers_removes_the_key_and_adds_metadata(
    budgetd: Budgetd,
) -> None:
    body = {
        "model": "llama3",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "x" * 60}],
    }
    answer = await budgetd.check(
        {
            "authorization": f"Bearer {budgetd.key}",
            "x-request-id": "req-allow",
            "content-type": "application/json",
            # A client cannot smuggle its own budget headers upstream.
            "x-budget-key-alias": "forged",
        },
        json.dumps(body).encode(),
    )
    assert answer.status.code == 0 and answer.WhichOneof("http_response") == "ok_response"
    headers = upstream_headers(answer)
    # 10 completion tokens at 2e-7 + 15 prompt tokens (60 characters / 4) at 1e-7.
    assert headers == {
        "x-budget-team-id": budgetd.team_id,
        "x-budget-reservation-id": headers["x-budget-reservation-id"],
        "x-budget-remaining-usd": "0.0",  # the hold uses it all
        "x-budget-reserved-usd": "3.5e-06",
        "x-budget-model": "llama3",
    }
    assert headers["x-budget-reservation-id"].startswith("r3.")
    options = answer.ok_response.headers
    assert all(
        o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for o in options
    )
    assert sorted(answer.ok_response.headers_to_remove) == ["authorization", "x-budget-key-alias"]
    metadata = dict(answer.dynamic_metadata)
    assert metadata["team_id"] == budgetd.team_id and metadata["allowed"] is True
    assert metadata["reservation_id"] == headers["x-budget-reservation-id"]
    assert metadata["reserved_usd"] == 3.5e-6 and metadata["model"] == "llama3"
    assert metadata["remaining_usd"] == 0.0 and metadata["key_id"].startswith("key_")


async def test_x_api_key_and_text_bodies_work_too(budgetd: Budgetd) -> None:
    answer = await budgetd.check(
        {"x-api-key": budgetd.key, "authorization": "Basic dXNlcjpwdw=="},
        json.dumps(CHAT).encode(),
        as_text=True,
    )
    assert answer.status.code == 0
    # Only the header that carried the budgetd key is removed.
    assert list(answer.ok_response.headers_to_remove) == ["x-api-key", "x-budget-key-alias"]
    assert upstream_headers(answer)["x-budget-model"] == "llama3"


async def test_raw_header_map_is_read_too(budgetd: Budgetd) -> None:
    """With ``encode_raw_headers: true`` Envoy sends ``header_map`` instead of ``headers``."""
    request = check_request({}, json.dumps(CHAT).encode())
    header_map = request.attributes.request.http.header_map
    header_map.headers.add(key="Authorization", raw_value=f"Bearer {budgetd.key}".encode())
    answer = await budgetd.authz.Check(request)
    assert answer.status.code == 0
    assert "authorization" in answer.ok_response.headers_to_remove


async def test_the_seed_second_request_is_denied_with_the_seed_body(budgetd: Budgetd) -> None:
    request = await budgetd.allow()
    exchange = Exchange(budgetd.proc)
    await exchange.run(
        request, 200, JSON, [json.dumps({"model": "llama3", "usage": USAGE}).encode()]
    )
    assert await budgetd.team_spend() == SEED_COST  # settled before the last reply

    answer = await budgetd.check(
        {"authorization": f"Bearer {budgetd.key}"}, json.dumps(CHAT).encode()
    )
    assert answer.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    denied = answer.denied_response
    assert denied.status.code == 400
    assert denied.body == SEED_BODY
    assert denied_headers(answer) == {"content-type": "application/json"}
    assert dict(answer.dynamic_metadata)["reason"] == "BUDGET_EXCEEDED"


async def test_deny_status_is_configurable(tmp_path: Path) -> None:
    async with serve(tmp_path, max_budget=0.0, deny_status=429) as budgetd:
        answer = await budgetd.check({"authorization": f"Bearer {budgetd.key}"})
        assert answer.denied_response.status.code == 429
        body = json.loads(answer.denied_response.body)
        assert body["error"]["code"] == 429
        assert (
            body["error"]["message"]
            == "Budget has been exceeded! Current cost: 0.0, Max budget: 0.0"
        )


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "No API key passed in the request."),
        ({"authorization": "Basic dXNlcjpwdw=="}, "No API key passed in the request."),
        ({"authorization": "Bearer sk-not-a-key"}, "Invalid API key."),
    ],
)
async def test_no_or_bad_credential_is_a_401_denial_not_an_error(
    budgetd: Budgetd, headers: dict[str, str], message: str
) -> None:
    answer = await budgetd.check(headers, json.dumps(CHAT).encode())
    assert answer.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert answer.denied_response.status.code == 401
    assert json.loads(answer.denied_response.body) == {
        "error": {"message": message, "type": "auth_error", "param": None, "code": 401}
    }


async def test_malformed_json_is_refused_with_400(budgetd: Budgetd) -> None:
    for body in (b'{"model": "llama3", "messages": [', b'{"model": "llama3", "max_tokens": -5}'):
        answer = await budgetd.check(
            {"authorization": f"Bearer {budgetd.key}", "content-type": "application/json"}, body
        )
        assert answer.status.code != 0
        assert answer.denied_response.status.code == 400
        error = json.loads(answer.denied_response.body)["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert await budgetd.remaining() == 1e-9  # nothing was held


async def test_a_body_over_the_limit_is_refused_with_413(tmp_path: Path) -> None:
    async with serve(tmp_path, max_body_bytes=1024) as budgetd:
        big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]})
        answer = await budgetd.check({"authorization": f"Bearer {budgetd.key}"}, big.encode())
        assert answer.denied_response.status.code == 413
        assert (
            "larger than 1024 bytes" in json.loads(answer.denied_response.body)["error"]["message"]
        )
        small = await budgetd.check(
            {"authorization": f"Bearer {budgetd.key}"}, json.dumps(CHAT).encode()
        )
        assert small.status.code == 0


async def test_a_non_json_body_is_checked_on_the_key_alone(budgetd: Budgetd) -> None:
    answer = await budgetd.check(
        {
            "authorization": f"Bearer {budgetd.key}",
            "content-type": "multipart/form-data; boundary=x",
        },
        b"--x\r\n\r\nnot json\r\n--x--",
    )
    assert answer.status.code == 0
    assert "x-budget-model" in answer.ok_response.headers_to_remove


async def test_backend_down_is_unavailable_never_an_allow(
    tmp_path: Path, database_url: str
) -> None:
    async with (
        RedisServer() as redis,
        serve(
            tmp_path, backend="postgres_redis", database_url=database_url, redis_url=redis.url
        ) as budgetd,
    ):
        assert (await budgetd.check({"authorization": f"Bearer {budgetd.key}"})).status.code == 0
        await redis.stop()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await budgetd.check({"authorization": f"Bearer {budgetd.key}"})
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis unavailable" in (err.value.details() or "")


async def test_reflection_lists_the_envoy_services(budgetd: Budgetd) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(budgetd.running.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for answer in stub.ServerReflectionInfo(iter([request])):
        names = {s.name for s in answer.list_services_response.service}
        break
    assert {"envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor",
            "budgetd.v1.BudgetAuthority"} <= names  # fmt: skip


# -- ext_proc ----------------------------------------------------------------------------


async def test_sse_usage_in_streamed_chunks_is_charged(budgetd: Budgetd) -> None:
    request = await budgetd.allow({**CHAT, "stream": True})
    exchange = Exchange(budgetd.proc)
    pieces = [piece for event in STREAM for piece in (event[:7], event[7:])]
    await exchange.run(request, 200, SSE, pieces)
    assert exchange.replies[:2] == ["request_headers", "response_headers"]
    assert exchange.replies[2:] == ["response_body"] * len(pieces)
    assert await budgetd.team_spend() == SEED_COST


async def test_the_cost_header_is_the_cost(budgetd: Budgetd) -> None:
    request = await budgetd.allow()
    exchange = Exchange(budgetd.proc)
    # The header wins over the body's usage (which would price at 3.5e-06).
    body = json.dumps({"usage": USAGE}).encode()
    await exchange.run(request, 200, {**JSON, "x-litellm-response-cost": "1.25e-06"}, [body])
    assert await budgetd.team_spend() == 1.25e-6


async def test_buffered_body_and_response_without_body(budgetd: Budgetd) -> None:
    request = await budgetd.allow()
    exchange = Exchange(budgetd.proc)
    await exchange.run(request, 204, {"x-litellm-response-cost": "0.0000035"}, [])
    assert exchange.replies == ["request_headers", "response_headers"]
    assert await budgetd.team_spend() == SEED_COST


async def test_request_body_and_trailers_are_answered_too(budgetd: Budgetd) -> None:
    exchange = Exchange(budgetd.proc)
    await exchange.send(headers_message("request_headers", await budgetd.allow()))
    await exchange.send(body_message("request_body", json.dumps(CHAT).encode(), True))
    await exchange.send(headers_message("response_headers", {":status": "200", **JSON}))
    await exchange.send(body_message("response_body", json.dumps({"usage": USAGE}).encode(), False))
    await exchange.send(headers_message("response_trailers", {"grpc-status": "0"}))
    await exchange.close()
    # With trailers the last body message has no end_of_stream: the trailers end the response.
    assert await budgetd.team_spend() == SEED_COST


async def test_a_request_without_a_hold_passes_untouched(budgetd: Budgetd) -> None:
    exchange = Exchange(budgetd.proc)
    body = json.dumps({"model": "llama3", "usage": USAGE}).encode()
    await exchange.run({"x-request-id": "no-hold"}, 200, JSON, [body])
    assert await budgetd.team_spend() == 0.0


@pytest.mark.parametrize("policy", ["release", "estimate"])
async def test_a_stream_cut_midway_releases_or_charges_the_estimate(
    tmp_path: Path, policy: str
) -> None:
    async with serve(tmp_path, max_budget=1.0, incomplete_response=policy) as budgetd:
        # max_tokens 10 and a 60-character prompt: a 3.5e-06 hold.
        body = {"model": "llama3", "max_tokens": 10, "stream": True,
                "messages": [{"role": "user", "content": "x" * 60}]}  # fmt: skip
        request = await budgetd.allow(body)
        assert request["x-budget-reserved-usd"] == "3.5e-06"
        assert await budgetd.remaining() == 1.0 - 3.5e-6
        exchange = Exchange(budgetd.proc)
        await exchange.send(headers_message("request_headers", request))
        await exchange.send(headers_message("response_headers", {":status": "200", **SSE}))
        await exchange.send(body_message("response_body", STREAM[0], False))
        exchange.call.cancel()  # the client went away: Envoy resets the stream
        if policy == "release":
            await eventually(budgetd.remaining, 1.0)
            assert await budgetd.team_spend() == 0.0
        else:
            await eventually(budgetd.team_spend, 3.5e-6)
            assert await budgetd.remaining() == 1.0 - 3.5e-6


@pytest.mark.parametrize("policy", ["release", "estimate"])
async def test_an_upstream_failure_without_usage_follows_the_policy(
    tmp_path: Path, policy: str
) -> None:
    async with serve(tmp_path, max_budget=1.0, incomplete_response=policy) as budgetd:
        # 10 completion tokens + 1 for "hi": a 2.1e-06 hold.
        request = await budgetd.allow({**CHAT, "max_tokens": 10})
        exchange = Exchange(budgetd.proc)
        error = json.dumps({"error": {"message": "upstream exploded"}}).encode()
        await exchange.run(request, 500, JSON, [error])
        expected = 0.0 if policy == "release" else 2.1e-6
        assert await budgetd.team_spend() == expected
        assert await budgetd.remaining() == 1.0 - expected


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -15, "completion_tokens": 10},
        {"prompt_tokens": 15, "completion_tokens": 10**12},
        {"prompt_tokens": "15", "completion_tokens": 10},
    ],
)
async def test_impossible_token_counts_are_no_usage(
    tmp_path: Path, usage: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(tmp_path, max_budget=1.0) as budgetd:
        request = await budgetd.allow({**CHAT, "max_tokens": 10})
        exchange = Exchange(budgetd.proc)
        with caplog.at_level(logging.WARNING, logger="budgetd.envoy"):
            await exchange.run(request, 200, JSON, [json.dumps({"usage": usage}).encode()])
        assert "impossible token counts" in caplog.text
        # No usage: the default policy releases the hold and charges nothing.
        assert await budgetd.team_spend() == 0.0
        assert await budgetd.remaining() == 1.0


async def test_a_reused_x_request_id_does_not_make_a_request_free(tmp_path: Path) -> None:
    async with serve(tmp_path, max_budget=1.0) as budgetd:
        body = json.dumps({"usage": USAGE}).encode()
        for _ in range(2):
            request = await budgetd.allow(request_id="same-id")
            await Exchange(budgetd.proc).run(request, 200, JSON, [body])
        assert await budgetd.team_spend() == 2 * SEED_COST
        assert await budgetd.remaining() == 1.0 - 2 * SEED_COST


async def test_unknown_model_usage_and_bad_holds_never_break_the_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(tmp_path, max_budget=1.0) as budgetd:
        request = await budgetd.allow({"model": "gpt-unpriced", "messages": []})
        body = json.dumps({"model": "gpt-unpriced", "usage": USAGE}).encode()
        with caplog.at_level(logging.WARNING, logger="budgetd.envoy"):
            await Exchange(budgetd.proc).run(request, 200, JSON, [body])
            forged = {"x-budget-reservation-id": "r1.forged.hold", "x-request-id": "f"}
            await Exchange(budgetd.proc).run(forged, 200, JSON, [body])
        assert "no price for model 'gpt-unpriced'" in caplog.text
        assert "not one budgetd issued" in caplog.text
        assert await budgetd.team_spend() == 0.0


def test_spend_request_ids() -> None:
    assert spend_request_id("abc", "r1.x.y") == "abc"
    derived = spend_request_id("", "r1.x.y")
    assert derived.startswith("envoy-") and derived == spend_request_id("x" * 300, "r1.x.y")
