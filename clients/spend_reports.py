"""Spend reports over budgetd's GetSpend, in LiteLLM's shapes where LiteLLM has one.

* ``GET /global/spend/report?start_date=&end_date=&group_by=team`` (the default): LiteLLM's
  ``[{"group_by_day", "teams": [{"team_name", "team_id", "total_spend", "metadata"}]}]``;
* ``GET /global/spend/report?...&group_by=api_key`` (or ``&api_key=``): LiteLLM's
  ``[{"api_key", "key_id", "key_alias", "total_cost", ..., "model_details"}]``, most first;
* ``GET /team/spend/report?team_id=&start_date=&end_date=``: one team, every day of the
  range (zeros included, for charts), per key and per model;
* ``GET /key/spend/report?key=&start_date=&end_date=``: one key (plaintext or key_id),
  every day and per model.

Dates are ``YYYY-MM-DD``, both included, on budgetd's ``budgetd.timezone`` wall clock;
without them a report covers the last 30 days up to today. Totals are summed exactly by
budgetd (a separate GetSpend per level), never by adding doubles here. When a report has
more rows than budgetd returns at once (10,000), the answer carries
``x-budgetd-truncated: true``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from clients.grpc_client import BudgetdClient, pb
from clients.http import HttpError, json_response

_LIMIT: Final = 10_000
_TEAM, _KEY, _MODEL, _DAY = (
    pb.SPEND_GROUP_TEAM,
    pb.SPEND_GROUP_KEY,
    pb.SPEND_GROUP_MODEL,
    pb.SPEND_GROUP_DAY,
)
UNASSIGNED_TEAM: Final = "Unassigned Team"  # LiteLLM's name for a team without an alias


class SpendReportEndpoints:
    """The handlers of the spend report endpoints (admin: they need the master key)."""

    def __init__(self, client: BudgetdClient) -> None:
        self._client = client

    def routes(self) -> list[web.RouteDef]:
        """The routes to add to the bridge's application."""
        return [
            web.get("/global/spend/report", self.global_report),
            web.get("/team/spend/report", self.team_report),
            web.get("/key/spend/report", self.key_report),
        ]

    async def global_report(self, request: web.Request) -> web.Response:
        """LiteLLM's ``/global/spend/report`` (group_by team, the default, or api_key)."""
        group_by = request.query.get("group_by", "team") or "team"
        api_key = request.query.get("api_key", "").strip()
        report = _Report(self._client, request)
        if group_by == "customer":
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                "group_by customer is not supported: budgetd does not record end users;"
                " group by team or api_key",
                param="group_by",
            )
        if api_key or group_by == "api_key":
            return report.answer(await _by_key(report, api_key))
        if group_by != "team":
            raise HttpError(
                HTTPStatus.BAD_REQUEST,
                f"group_by must be team or api_key (got {group_by[:40]!r})",
                param="group_by",
            )
        return report.answer(await _by_team(report))

    async def team_report(self, request: web.Request) -> web.Response:
        """One team's spend: daily (every day of the range), per key and per model."""
        team_id = _required(request, "team_id")
        team = await self._client.get_team(
            pb.GetTeamRequest(team_id=team_id), authorization=request.headers.get("authorization")
        )
        report = _Report(self._client, request, team_id=team_id)
        daily = await report.get(_DAY)
        keys = await report.get(_KEY)
        models = await report.get(_MODEL)
        body = report.header(daily) | {
            "team_id": team.team_id,
            "team_alias": team.team_alias,
            "daily": _daily(daily),
            "keys": [
                {"key_id": r.key_id, "key_alias": r.key_alias or None} | _sums(r)
                for r in _most_first(keys.rows)
            ],
            "models": [{"model": r.model or None} | _sums(r) for r in _most_first(models.rows)],
        }
        return report.answer(body)

    async def key_report(self, request: web.Request) -> web.Response:
        """One key's spend (``key`` is the plaintext key or its key_id): daily and per model."""
        key = _required(request, "key")
        lookup = (
            pb.GetKeyRequest(key=key) if key.startswith("sk-") else pb.GetKeyRequest(key_id=key)
        )
        found = await self._client.get_key(
            lookup, authorization=request.headers.get("authorization")
        )
        report = _Report(self._client, request, key_id=found.key_id)
        daily = await report.get(_DAY)
        models = await report.get(_MODEL)
        body = report.header(daily) | {
            "key_id": found.key_id,
            "key_alias": found.key_alias or None,
            "team_id": found.team_id,
            "daily": _daily(daily),
            "models": [{"model": r.model or None} | _sums(r) for r in _most_first(models.rows)],
        }
        return report.answer(body)


class _Report:
    """The GetSpend calls of one HTTP request: same range, filters and credentials."""

    def __init__(
        self, client: BudgetdClient, request: web.Request, *, team_id: str = "", key_id: str = ""
    ) -> None:
        self._client = client
        self._authorization = request.headers.get("authorization")
        self._start = request.query.get("start_date", "").strip()
        self._end = request.query.get("end_date", "").strip()
        self._team_id = team_id or request.query.get("team_id", "").strip()
        self._key_id = key_id
        self.truncated = False

    async def get(self, *group_by: pb.SpendGroup.ValueType, key: str = "") -> pb.GetSpendResponse:
        request = pb.GetSpendRequest(
            start_date=self._start,
            end_date=self._end,
            group_by=group_by,
            team_id=self._team_id,
            limit=_LIMIT,
        )
        if key.startswith("sk-"):
            request.key = key
        elif key:
            request.key_id = key
        elif self._key_id:
            request.key_id = self._key_id
        answer = await self._client.get_spend(request, authorization=self._authorization)
        self.truncated = self.truncated or answer.truncated
        return answer

    def header(self, answer: pb.GetSpendResponse) -> dict[str, Any]:
        return {
            "start_date": answer.start_date,
            "end_date": answer.end_date,
            "timezone": answer.timezone,
            "total_spend": answer.total_spend,
        }

    def answer(self, body: dict[str, Any] | list[Any]) -> web.Response:
        headers = {"x-budgetd-truncated": "true"} if self.truncated else None
        return json_response(body, headers=headers)


async def _by_team(report: _Report) -> list[dict[str, Any]]:
    """LiteLLM's group_by=team: per day, per team, with per key and model metadata."""
    totals = await report.get(_DAY, _TEAM)
    detail = await report.get(_DAY, _TEAM, _KEY, _MODEL)
    metadata: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in detail.rows:
        metadata.setdefault((r.day, r.team_id), []).append(
            {
                "model": r.model or None,
                "api_key": r.hashed_api_key,
                "key_id": r.key_id,
                "key_alias": r.key_alias or None,
                "spend": r.spend,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
            }
        )
    days: dict[str, list[dict[str, Any]]] = {}
    for r in totals.rows:
        days.setdefault(r.day, []).append(
            {
                "team_name": r.team_alias or UNASSIGNED_TEAM,
                "team_id": r.team_id,
                "total_spend": r.spend,
                "metadata": metadata.get((r.day, r.team_id), []),
            }
        )
    return [{"group_by_day": day, "teams": teams} for day, teams in days.items()]


async def _by_key(report: _Report, key: str) -> list[dict[str, Any]]:
    """LiteLLM's group_by=api_key: ``[{api_key, total_cost, ..., model_details}]``."""
    totals = await report.get(_KEY, key=key)
    detail = await report.get(_KEY, _MODEL, key=key)
    models: dict[str, list[dict[str, Any]]] = {}
    for r in detail.rows:
        models.setdefault(r.key_id, []).append({"model": r.model or None} | _costs(r))
    return [
        {"api_key": r.hashed_api_key, "key_id": r.key_id, "key_alias": r.key_alias or None}
        | _costs(r)
        | {"model_details": models.get(r.key_id, [])}
        for r in _most_first(totals.rows)
        if r.requests
    ]


def _daily(answer: pb.GetSpendResponse) -> list[dict[str, Any]]:
    """Every day of the range, in order, with zeros where nothing was spent."""
    found = {r.day: r for r in answer.rows}
    first, last = date.fromisoformat(answer.start_date), date.fromisoformat(answer.end_date)
    out = []
    for n in range((last - first).days + 1):
        day = (first + timedelta(days=n)).isoformat()
        row = found.get(day)
        out.append({"date": day} | (_sums(row) if row else _ZERO))
    return out


_ZERO: Final = {"spend": 0.0, "requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


def _sums(r: pb.SpendRow) -> dict[str, Any]:
    return {
        "spend": r.spend,
        "requests": r.requests,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
    }


def _costs(r: pb.SpendRow) -> dict[str, Any]:
    return {
        "total_cost": r.spend,
        "total_input_tokens": r.prompt_tokens,
        "total_output_tokens": r.completion_tokens,
    }


def _most_first(rows: Iterable[pb.SpendRow]) -> list[pb.SpendRow]:
    return sorted(rows, key=lambda r: -r.spend)


def _required(request: web.Request, name: str) -> str:
    value = request.query.get(name, "").strip()
    if not value:
        raise HttpError(
            HTTPStatus.BAD_REQUEST, f"{name} is required: add ?{name}=... to the URL", param=name
        )
    return value
