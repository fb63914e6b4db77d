"""Spend reports from the ledger: RecordStore.spend_report and list_keys on both backends, the
GetSpend rules (dates, time zone, limits), and the GetSpend/ListKeys RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from harness import (
    ADMIN,
    BACKENDS,
    SEED_INSTANT,
    Backend,
    backend_urls,
    make_settings,
    open_backend,
    running_server,
)
from server.admin import NewKey, NewTeam
from server.authority import SpendRequest
from server.config import Settings
from server.errors import InvalidArgument, NotFound
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.reports import SpendReports
from server.reports import SpendRequest as Report
from server.storage.base import SpendGroup, SpendQuery, SpendRow

DAY1 = SEED_INSTANT  # 2024-06-13T22:48:36Z (already 2024-06-14 in Paris)
DAY2 = SEED_INSTANT + 3 * 3600  # 2024-06-14T01:48:36Z
START, END = 1718236800.0, 1718409600.0  # [2024-06-13T00:00Z, 2024-06-15T00:00Z)


@dataclass
class Ledger:
    """Two teams, three keys, spends on two days with two models."""

    backend: Backend
    alpha: str
    beta: str
    a1: str
    a2: str
    b1: str


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    return request.param, make_settings(tmp_path, **backend_urls(request, request.param))


@pytest.fixture
async def ledger(backend_settings: tuple[str, Settings]) -> AsyncIterator[Ledger]:
    async with open_backend(*backend_settings) as b:
        alpha = (await b.admin.create_team(NewTeam(team_alias="alpha"))).team.team_id
        beta = (await b.admin.create_team(NewTeam(team_alias="beta"))).team.team_id
        keys = {}
        for name, team in (("a1", alpha), ("a2", alpha), ("b1", beta)):
            issued = await b.admin.issue_key(NewKey(team_id=team, key_alias=name))
            keys[name] = (issued.plaintext, issued.view.key.key_id)
        spends = [  # (when, key, model, cost, count)
            (DAY1, "a1", "llama3", 1e-7, 10),  # ten spends of 1e-7: exactly 1e-6
            (DAY1, "a2", "gpt-4o", 0.25, 1),
            (DAY2, "a1", "gpt-4o", 0.5, 2),
            (DAY2, "b1", "llama3", 0.0000035, 1),
        ]
        n = 0
        for when, key, model, cost, count in spends:
            b.clock.set(when)
            for _ in range(count):
                n += 1
                await b.authority.record(
                    SpendRequest(
                        request_id=f"r{n}",
                        api_key=keys[key][0],
                        cost=cost,
                        model=model,
                        prompt_tokens=10,
                        completion_tokens=5,
                    )
                )
        yield Ledger(b, alpha, beta, keys["a1"][1], keys["a2"][1], keys["b1"][1])


def _query(*group_by: SpendGroup, **changes: object) -> SpendQuery:
    return SpendQuery(start=START, end=END, group_by=group_by, **changes)  # type: ignore[arg-type]


async def test_one_total_row_without_grouping_sums_exactly(ledger: Ledger) -> None:
    rows = await ledger.backend.records.spend_report(_query())
    assert rows == [SpendRow(1_250_004_500, 14, 140, 70)]  # 1e-6 + 0.25 + 1.0 + 3.5e-6 USD


async def test_grouped_by_day_and_team_with_names_in_order(ledger: Ledger) -> None:
    rows = await ledger.backend.records.spend_report(_query(SpendGroup.TEAM, SpendGroup.DAY))
    day2 = sorted([(ledger.alpha, "alpha", 1_000_000_000, 2), (ledger.beta, "beta", 3_500, 1)])
    assert [(r.day, r.team_id, r.team_alias, r.spend_nanos, r.requests) for r in rows] == [
        ("2024-06-13", ledger.alpha, "alpha", 250_001_000, 11),
        *(("2024-06-14", *team) for team in day2),
    ]
    assert all(r.key_id == "" and r.model == "" for r in rows)


async def test_grouped_by_key_and_model_names_keys_with_their_hash(ledger: Ledger) -> None:
    rows = await ledger.backend.records.spend_report(
        _query(SpendGroup.KEY, SpendGroup.MODEL, team_id=ledger.alpha)
    )
    got = {(r.key_alias, r.model): (r.spend_nanos, r.requests) for r in rows}
    assert got == {
        ("a1", "llama3"): (1_000, 10),
        ("a1", "gpt-4o"): (1_000_000_000, 2),
        ("a2", "gpt-4o"): (250_000_000, 1),
    }
    assert all(len(r.key_hash) == 64 and r.team_id == "" for r in rows)


async def test_days_are_calendar_days_of_the_time_zone(ledger: Ledger) -> None:
    rows = await ledger.backend.records.spend_report(
        _query(SpendGroup.DAY, timezone="Europe/Paris")
    )
    # 22:48 UTC on the 13th is 00:48 on the 14th in Paris: every spend is on the 14th.
    assert [(r.day, r.spend_nanos) for r in rows] == [("2024-06-14", 1_250_004_500)]


async def test_filters_range_and_limit(ledger: Ledger) -> None:
    records = ledger.backend.records
    only_b1 = await records.spend_report(_query(key_id=ledger.b1))
    assert [r.spend_nanos for r in only_b1] == [3_500]
    llama = await records.spend_report(_query(SpendGroup.TEAM, model="llama3"))
    assert {r.team_alias: r.spend_nanos for r in llama} == {"alpha": 1_000, "beta": 3_500}
    day1_only = await records.spend_report(SpendQuery(start=START, end=DAY2))
    assert [r.spend_nanos for r in day1_only] == [250_001_000]
    limited = await records.spend_report(_query(SpendGroup.KEY, limit=2))
    assert len(limited) == 2


async def test_list_keys_pages_by_key_id_and_hides_revoked_keys(ledger: Ledger) -> None:
    b = ledger.backend
    alpha_keys = await b.records.list_keys(ledger.alpha, "", 10)
    assert [k.key_id for k in alpha_keys] == sorted([ledger.a1, ledger.a2])
    first = await b.records.list_keys("", "", 2)
    rest = await b.records.list_keys("", first[-1].key_id, 2)
    assert [k.key_id for k in first + rest] == sorted([ledger.a1, ledger.a2, ledger.b1])
    await b.admin.revoke_key(key_id=ledger.a2)
    assert [k.key_id for k in await b.records.list_keys(ledger.alpha, "", 10)] == [ledger.a1]
    with_revoked = await b.records.list_keys(ledger.alpha, "", 10, include_revoked=True)
    assert len(with_revoked) == 2
    views, token = await b.admin.list_keys(ledger.alpha, 10, "")
    assert token == "" and [v.spend_nanos for v in views] == [1_000_001_000]


async def test_reports_take_calendar_dates_and_say_when_truncated(ledger: Ledger) -> None:
    b = ledger.backend
    reports = SpendReports(b.records, b.clock, "UTC")
    both = await reports.spend(Report("2024-06-13", "2024-06-14", (SpendGroup.DAY,)))
    assert [(r.day, r.spend_nanos) for r in both.rows] == [
        ("2024-06-13", 250_001_000),
        ("2024-06-14", 1_000_003_500),
    ]
    assert both.total_nanos == 1_250_004_500 and not both.truncated
    cut = await reports.spend(Report("2024-06-13", "2024-06-14", (SpendGroup.KEY,), limit=1))
    assert cut.truncated and len(cut.rows) == 1
    assert cut.total_nanos == 1_250_004_500  # the whole range, not just the row shown
    b.clock.set(DAY2)  # no dates: the 30 days up to today
    default = await reports.spend(Report(key=await _plaintext_of(b, ledger)))
    assert (str(default.start_date), str(default.end_date)) == ("2024-05-16", "2024-06-14")
    assert default.rows[0].spend_nanos == 3_500


async def _plaintext_of(b: Backend, ledger: Ledger) -> str:
    # The key_id filter and a plaintext key reach the same rows; issue a fresh key to have one.
    issued = await b.admin.issue_key(NewKey(team_id=ledger.beta, key_alias="fresh"))
    b.clock.set(DAY2)
    await b.authority.record(
        SpendRequest(request_id="fresh", api_key=issued.plaintext, cost=3.5e-6)
    )
    return issued.plaintext


@pytest.mark.parametrize(
    ("request_", "error", "words"),
    [
        (Report("2024-13-01"), InvalidArgument, "start_date must be a date"),
        (Report("2024-06-14", "2024-06-13"), InvalidArgument, "is after end_date"),
        (Report("2000-01-01", "2024-06-13"), InvalidArgument, "longer than"),
        (Report(limit=-1), InvalidArgument, "limit"),
        (Report(key="sk-nobody"), NotFound, "key not found"),
        (Report(team_id="bad id"), InvalidArgument, "team_id"),
    ],
)
async def test_bad_report_questions_are_refused_with_a_reason(
    tmp_path: Path, request_: Report, error: type[Exception], words: str
) -> None:
    async with open_backend("embedded", make_settings(tmp_path)) as b:
        with pytest.raises(error, match=words):
            await SpendReports(b.records, b.clock, "UTC").spend(request_)


async def test_get_spend_and_list_keys_over_grpc(tmp_path: Path) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        team = await running.stub.CreateTeam(pb.CreateTeamRequest(team_alias="t"), metadata=ADMIN)
        key = await running.stub.IssueKey(
            pb.IssueKeyRequest(team_id=team.team_id, key_alias="k"), metadata=ADMIN
        )
        for n in range(3):
            await running.stub.RecordSpend(
                pb.RecordSpendRequest(request_id=f"q{n}", api_key=key.key, cost=1e-7, model="m")
            )
        report = await running.stub.GetSpend(
            pb.GetSpendRequest(group_by=[pb.SPEND_GROUP_KEY, pb.SPEND_GROUP_MODEL]),
            metadata=ADMIN,
        )
        assert report.total_spend == 3e-07 and not report.truncated and report.timezone == "UTC"
        (row,) = report.rows
        assert (row.key_id, row.key_alias, row.model, row.requests) == (key.key_id, "k", "m", 3)
        assert row.spend == 3e-07 and row.team_id == ""
        listed = await running.stub.ListKeys(
            pb.ListKeysRequest(team_id=team.team_id), metadata=ADMIN
        )
        assert [k.key_id for k in listed.keys] == [key.key_id]
        assert listed.keys[0].spend == 3e-07
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.GetSpend(pb.GetSpendRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.GetSpend(pb.GetSpendRequest(start_date="June"), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await running.stub.ListKeys(pb.ListKeysRequest(team_id="nope"), metadata=ADMIN)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
