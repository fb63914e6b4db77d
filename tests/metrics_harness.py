"""Test helpers for /metrics: scrape a running server and read samples by name and labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from harness import ADMIN, Running
from server.gen.budgetd.v1 import budgetd_pb2 as pb

SEED_TEAM = pb.CreateTeamRequest(team_alias="QA Prod Bot", max_budget=1e-9, budget_duration="1d")


@dataclass(frozen=True)
class Scrape:
    """One /metrics answer: its text and every sample, parsed by prometheus_client's parser."""

    text: str
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels (KeyError when absent)."""
        return self.samples[(name, frozenset(labels.items()))]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def named(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every sample called ``name``, by its label set."""
        return {labels: value for (n, labels), value in self.samples.items() if n == name}


def parse(text: str) -> Scrape:
    """Parse an exposition (fails the test if prometheus_client cannot)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(text, samples)


async def scrape(running: Running) -> Scrape:
    """GET /metrics of an in-process server."""
    url = f"http://127.0.0.1:{running.server.metrics_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        return parse(await answer.text())


async def seed_team_and_key(
    running: Running, team: pb.CreateTeamRequest = SEED_TEAM, **key_fields: object
) -> tuple[pb.Team, pb.IssueKeyResponse]:
    """Create a team (the seed's by default) and one key for it."""
    created = await running.stub.CreateTeam(team, metadata=ADMIN)
    key = await running.stub.IssueKey(
        pb.IssueKeyRequest(team_id=created.team_id, **key_fields),  # type: ignore[arg-type]
        metadata=ADMIN,
    )
    return created, key


async def spend(running: Running, key: str, request_id: str, cost: float) -> pb.CheckBudgetResponse:
    """A CheckBudget then its RecordSpend; the check's answer."""
    check = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key))
    await running.stub.RecordSpend(
        pb.RecordSpendRequest(request_id=request_id, reservation_id=check.reservation_id, cost=cost)
    )
    return check


def team_labels(team: pb.Team) -> Mapping[str, str]:
    return {"team_alias": team.team_alias, "team_id": team.team_id}
