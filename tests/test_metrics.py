"""Prometheus at /metrics: the seed's line, LiteLLM's budget gauges and budgetd's own, correct
after every settle, after a reset and on a replica that did not handle the spend."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from harness import (
    ADMIN,
    BACKENDS,
    SEED_INSTANT,
    backend_urls,
    make_settings,
    running_server,
)
from metrics_harness import scrape, seed_team_and_key, spend, team_labels
from server.clock import FakeClock
from server.config import Settings
from server.errors import Unavailable
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.scopes import team_scope
from server.storage.base import TeamRecord

MIDNIGHT_AFTER_SEED = 1718323200.0  # 2024-06-14T00:00:00Z, the seed team's budget_reset_at


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    return request.param, make_settings(tmp_path, **backend_urls(request, request.param))


@pytest.fixture
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings of replicas sharing one Postgres and one Redis."""
    return make_settings(tmp_path, **backend_urls(request, "postgres_redis"))


async def test_the_seed_walkthrough_shows_the_seeds_prometheus_line(
    backend: tuple[str, Settings],
) -> None:
    name, settings = backend
    async with running_server(name, settings, clock=FakeClock(SEED_INSTANT)) as running:
        team, key = await seed_team_and_key(running)
        await spend(running, key.key, "req-1", 0.0000035)
        denied = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        assert denied.reason == pb.BUDGET_EXCEEDED
        got = await scrape(running)

    labels = team_labels(team)
    # LiteLLM reports max_budget - spend as computed (negative once the crossing request
    # completed); budgetd computes it from exact nano-USD: 1 - 3500 nano = -3.499e-06.
    line = (
        'litellm_remaining_team_budget_metric{team_alias="QA Prod Bot",'
        f'team_id="{team.team_id}"}} -3.499e-06'
    )
    assert line in got.text.splitlines()
    assert got.value("litellm_remaining_team_budget_metric", **labels) == pytest.approx(
        1e-9 - 3.5e-6, abs=1e-15
    )
    assert got.value("litellm_team_max_budget_metric", **labels) == 1e-09
    hours = got.value("litellm_team_budget_remaining_hours_metric", **labels)
    assert hours == pytest.approx((MIDNIGHT_AFTER_SEED - SEED_INSTANT) / 3600)
    # The key has no budget of its own: unlimited, as LiteLLM shows it.
    key_labels = {"hashed_api_key": hashlib.sha256(key.key.encode()).hexdigest()}
    key_labels["api_key_alias"] = ""
    assert got.value("litellm_remaining_api_key_budget_metric", **key_labels) == math.inf
    assert not got.has("litellm_api_key_max_budget_metric", **key_labels)
    # budgetd's own.
    assert got.value("budgetd_spend_usd_total", team_id=team.team_id) == 3.5e-06
    allowed = {"outcome": "allowed", "reason": "REASON_UNSPECIFIED", "scope": "team"}
    assert got.value("budgetd_decisions_total", **allowed) == 1
    denied_labels = {"outcome": "denied", "reason": "BUDGET_EXCEEDED", "scope": "team"}
    assert got.value("budgetd_decisions_total", **denied_labels) == 1
    assert got.value("budgetd_rpc_duration_seconds_count", method="CheckBudget") == 2
    assert got.value("budgetd_rpc_duration_seconds_count", method="RecordSpend") == 1
    assert got.value("budgetd_holds_outstanding_usd", team_id=team.team_id) == 0
    assert got.value("budgetd_budget_scrape_ok") == 1
    assert got.named("budgetd_counter_drift_usd") == {}
    assert got.value("budgetd_counter_drift_checked_teams") == 1


async def test_remaining_follows_every_settle_and_resets_with_the_window(
    backend: tuple[str, Settings],
) -> None:
    name, settings = backend
    clock = FakeClock(SEED_INSTANT)
    budget = pb.CreateTeamRequest(team_alias="daily", max_budget=1.0, budget_duration="1d")
    async with running_server(name, settings, clock=clock) as running:
        team, key = await seed_team_and_key(
            running, budget, key_alias="bot", max_budget=0.5, budget_duration="1h"
        )
        labels = team_labels(team)
        key_labels = {
            "hashed_api_key": hashlib.sha256(key.key.encode()).hexdigest(),
            "api_key_alias": "bot",
        }
        remaining = "litellm_remaining_team_budget_metric"
        assert (await scrape(running)).value(remaining, **labels) == 1.0

        await spend(running, key.key, "a", 0.25)
        got = await scrape(running)
        assert got.value(remaining, **labels) == 0.75
        assert got.value("litellm_remaining_api_key_budget_metric", **key_labels) == 0.25
        assert got.value("litellm_api_key_max_budget_metric", **key_labels) == 0.5
        # The key resets at the top of the hour (23:00), the team at midnight.
        key_hours = got.value("litellm_api_key_budget_remaining_hours_metric", **key_labels)
        assert key_hours == pytest.approx((MIDNIGHT_AFTER_SEED - 3600 - SEED_INSTANT) / 3600)

        await spend(running, key.key, "b", 0.125)
        assert (await scrape(running)).value(remaining, **labels) == 0.625

        clock.set(MIDNIGHT_AFTER_SEED + 1)  # a new day: a new window
        got = await scrape(running)
        assert got.value(remaining, **labels) == 1.0
        assert got.value("litellm_team_budget_remaining_hours_metric", **labels) == (
            pytest.approx((86400 - 1) / 3600)
        )
        assert got.value("litellm_remaining_api_key_budget_metric", **key_labels) == 0.5
        # The counter of budgetd's own spend is a counter: it does not reset.
        assert got.value("budgetd_spend_usd_total", team_id=team.team_id) == 0.375

        await spend(running, key.key, "c", 0.5)
        assert (await scrape(running)).value(remaining, **labels) == 0.5


async def test_a_replica_that_handled_nothing_reports_every_spend_and_hold(
    shared: Settings,
) -> None:
    settings = shared
    clock = FakeClock(SEED_INSTANT)
    budget = pb.CreateTeamRequest(team_alias="shared", max_budget=2.0, budget_duration="1d")
    async with (
        running_server("postgres_redis", settings, clock=clock) as a,
        running_server("postgres_redis", settings, clock=clock) as b,
    ):
        team, key = await seed_team_and_key(a, budget)
        labels = team_labels(team)
        await spend(a, key.key, "one", 0.5)
        on_b = await scrape(b)
        assert on_b.value("litellm_remaining_team_budget_metric", **labels) == 1.5
        assert on_b.value("litellm_team_max_budget_metric", **labels) == 2.0
        # budgetd_spend_usd_total counts what each replica recorded (sum them in PromQL).
        assert not on_b.has("budgetd_spend_usd_total", team_id=team.team_id)
        assert (await scrape(a)).value("budgetd_spend_usd_total", team_id=team.team_id) == 0.5

        # A hold placed through A shows on B; B's next scrape sees A's next settle.
        held = await a.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key, estimated_cost=0.25))
        on_b = await scrape(b)
        assert on_b.value("budgetd_holds_outstanding_usd", team_id=team.team_id) == 0.25
        await a.stub.RecordSpend(
            pb.RecordSpendRequest(request_id="two", reservation_id=held.reservation_id, cost=0.2)
        )
        on_b = await scrape(b)
        assert on_b.value("litellm_remaining_team_budget_metric", **labels) == 1.3
        assert on_b.value("budgetd_holds_outstanding_usd", team_id=team.team_id) == 0


async def test_counter_drift_from_the_ledger_is_reported_until_repaired(
    shared: Settings,
) -> None:
    settings = shared
    async with running_server("postgres_redis", settings, clock=FakeClock(SEED_INSTANT)) as running:
        team, key = await seed_team_and_key(running)
        await spend(running, key.key, "req-1", 0.0000035)
        record = TeamRecord(team.team_id, team.team_alias, 1, "1d")
        counter = team_scope(record, SEED_INSTANT, settings.tzinfo).counter_id
        redis_key = f"bd:{{t:{team.team_id}}}:c:{counter}"
        client = aioredis.Redis.from_url(settings.redis_url or "")
        try:
            assert await client.hincrby(redis_key, "spend", 5) == 3505
            got = await scrape(running)
            assert got.value("budgetd_counter_drift_usd", team_id=team.team_id) == 5e-09
            # What budgets enforce is the counter: the gauges show it too.
            assert got.value(
                "litellm_remaining_team_budget_metric", **team_labels(team)
            ) == pytest.approx(-3.504e-06)
            await client.hincrby(redis_key, "spend", -5)
            got = await scrape(running)
            assert got.named("budgetd_counter_drift_usd") == {}
        finally:
            await client.aclose()


async def test_a_backend_outage_is_counted_and_leaves_budget_series_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team, key = await seed_team_and_key(running)
        records = running.server.stores.records

        async def down(*args: object, **kwargs: object) -> None:
            raise Unavailable("sqlite unavailable: disk I/O error")

        monkeypatch.setattr(records, "get_key_by_hash", down)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        monkeypatch.setattr(records, "list_teams", down)
        got = await scrape(running)
        assert got.value("budgetd_backend_errors_total", backend="sqlite") == 2
        assert got.value("budgetd_budget_scrape_ok") == 0
        assert got.named("litellm_remaining_team_budget_metric") == {}
        monkeypatch.undo()
        got = await scrape(running)
        assert got.value("budgetd_budget_scrape_ok") == 1
        assert got.has("litellm_remaining_team_budget_metric", **team_labels(team))


async def test_unlimited_and_never_resetting_teams_read_as_litellm_shows_them(
    tmp_path: Path,
) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="free"), metadata=ADMIN
        )
        got = await scrape(running)
    labels = team_labels(team)
    assert got.value("litellm_remaining_team_budget_metric", **labels) == math.inf
    assert not got.has("litellm_team_max_budget_metric", **labels)
    assert not got.has("litellm_team_budget_remaining_hours_metric", **labels)
    assert "+Inf" in got.text


async def test_metrics_are_off_when_the_config_says_so(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, metrics_enabled=False)
    async with running_server("embedded", settings) as running:
        assert running.server.metrics_port == 0


async def test_soft_budget_crossings_are_counted_and_answered(
    backend: tuple[str, Settings],
) -> None:
    name, settings = backend
    async with running_server(name, settings, clock=FakeClock(SEED_INSTANT)) as running:
        team = await running.stub.CreateTeam(
            pb.CreateTeamRequest(team_alias="soft", max_budget=1.0, soft_budget=0.5),
            metadata=ADMIN,
        )
        key = await running.stub.IssueKey(pb.IssueKeyRequest(team_id=team.team_id), metadata=ADMIN)
        await spend(running, key.key, "soft-1", 0.6)
        answer = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key.key))
        assert answer.allowed and answer.soft_budget_exceeded
        got = await scrape(running)
    assert got.value("budgetd_soft_budget_exceeded_total", team_id=team.team_id) == 1


async def test_group_commits_and_redis_pipelines_are_counted(
    backend: tuple[str, Settings],
) -> None:
    """Concurrent RecordSpends share ledger commits and Redis round trips, and the counters
    say how many rows and calls each carried (read from the batchers at scrape time)."""
    name, settings = backend
    budget = pb.CreateTeamRequest(team_alias="grouped", max_budget=100.0, budget_duration="1d")
    spends = 40
    async with running_server(name, settings, clock=FakeClock(SEED_INSTANT)) as running:
        _, key = await seed_team_and_key(running, budget)
        before = await scrape(running)
        await asyncio.gather(
            *(
                running.stub.RecordSpend(
                    pb.RecordSpendRequest(request_id=f"grouped-{i}", api_key=key.key, cost=0.01)
                )
                for i in range(spends)
            )
        )
        after = await scrape(running)

    names = (
        "budgetd_ledger_group_commits_total",
        "budgetd_ledger_group_commit_rows_total",
        "budgetd_redis_script_round_trips_total",
        "budgetd_redis_script_calls_total",
    )
    if name == "embedded":  # SQLite and in-process counters: nothing is batched
        assert not any(after.named(each) for each in names)
        return
    grew = {each: after.value(each) - before.value(each) for each in names}
    assert grew["budgetd_ledger_group_commit_rows_total"] == spends  # one row per spend
    assert 1 <= grew["budgetd_ledger_group_commits_total"] < spends  # and rows shared commits
    # Each spend announces its settle and settles: two script calls at least (the first
    # one's counter rebuild adds a few), which shared round trips.
    calls = grew["budgetd_redis_script_calls_total"]
    assert calls >= 2 * spends
    assert 1 <= grew["budgetd_redis_script_round_trips_total"] < calls
