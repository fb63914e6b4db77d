"""The bridge's operator endpoints: team and key listings, LiteLLM-style spend reports, and
the admin page's static files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge_harness import MASTER, running_bridge
from harness import SEED_INSTANT, make_settings, running_server
from server.clock import FakeClock

DAY2 = SEED_INSTANT + 3 * 3600  # 2024-06-14T01:48:36Z


@dataclass
class Site:
    url: str
    http: aiohttp.ClientSession
    clock: FakeClock

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, dict[str, str]]:
        async with self.http.get(self.url + path, **kw) as answer:
            text = await answer.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return answer.status, body, dict(answer.headers)

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.http.post(self.url + path, headers=MASTER, json=body) as answer:
            assert answer.status == 200, await answer.text()
            return await answer.json()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    settings = make_settings(tmp_path)
    clock = FakeClock(SEED_INSTANT)
    async with (
        running_server("embedded", settings, clock=clock) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        yield Site(bridge.url, http, clock)


async def _spend(site: Site, key: str, request_id: str, cost: float, model: str) -> None:
    body = {"request_id": request_id, "cost": cost, "model": model}
    async with site.http.post(
        site.url + "/spend", headers={"Authorization": f"Bearer {key}"}, json=body
    ) as answer:
        assert answer.status == 200, await answer.text()


async def _two_days(site: Site) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    team = await site.post("/team/new", {"team_alias": "QA Prod Bot", "max_budget": 1.0})
    other = await site.post("/team/new", {"team_alias": "", "team_id": "zz-unnamed"})
    key = await site.post("/key/generate", {"team_id": team["team_id"], "key_alias": "bot"})
    stray = await site.post("/key/generate", {"team_id": other["team_id"]})
    await _spend(site, key["key"], "r1", 0.25, "llama3")
    await _spend(site, stray["key"], "r2", 0.5, "gpt-4o")
    site.clock.set(DAY2)
    await _spend(site, key["key"], "r3", 0.0000035, "gpt-4o")
    return team, key, stray


async def test_team_list_and_key_list_show_spend_and_never_a_plaintext_key(site: Site) -> None:
    team, key, _ = await _two_days(site)
    status, teams, _ = await site.get("/team/list", headers=MASTER)
    assert status == 200
    # By team_id (a UUID sorts before "zz-unnamed"), with all-time spend (no duration).
    assert [(t["team_alias"], t["spend"]) for t in teams] == [
        ("QA Prod Bot", 0.2500035),
        ("", 0.5),
    ]
    assert teams[0]["max_budget"] == 1.0 and teams[0]["team_id"] == team["team_id"]
    status, keys, _ = await site.get(f"/key/list?team_id={team['team_id']}", headers=MASTER)
    assert status == 200 and keys["total_count"] == 1
    (info,) = keys["keys"]
    assert info["key_id"] == key["key_id"] and info["key_alias"] == "bot"
    assert key["key"] not in json.dumps(keys)
    status, body, _ = await site.get("/team/list")
    assert status == 401 and body["error"]["type"] == "auth_error"


async def test_global_report_by_team_in_litellms_shape(site: Site) -> None:
    _, key, _ = await _two_days(site)
    query = "?start_date=2024-06-13&end_date=2024-06-14"
    status, days, _ = await site.get("/global/spend/report" + query, headers=MASTER)
    assert status == 200
    assert [d["group_by_day"] for d in days] == ["2024-06-13", "2024-06-14"]
    first = {t["team_name"]: t for t in days[0]["teams"]}
    assert set(first) == {"QA Prod Bot", "Unassigned Team"}  # LiteLLM's name for no alias
    assert first["QA Prod Bot"]["total_spend"] == 0.25
    (detail,) = first["QA Prod Bot"]["metadata"]
    assert detail["model"] == "llama3" and detail["key_alias"] == "bot"
    assert detail["api_key"] == hashlib.sha256(key["key"].encode()).hexdigest()
    assert days[1]["teams"][0]["total_spend"] == 3.5e-06


async def test_global_report_by_api_key_puts_the_biggest_spender_first(site: Site) -> None:
    _, key, stray = await _two_days(site)
    query = "?start_date=2024-06-13&end_date=2024-06-14&group_by=api_key"
    status, rows, _ = await site.get("/global/spend/report" + query, headers=MASTER)
    assert status == 200
    assert [r["key_id"] for r in rows] == [stray["key_id"], key["key_id"]]
    assert rows[1]["total_cost"] == 0.2500035
    assert {m["model"]: m["total_cost"] for m in rows[1]["model_details"]} == {
        "llama3": 0.25,
        "gpt-4o": 3.5e-06,
    }
    status, only, _ = await site.get(
        f"/global/spend/report{query}&api_key={key['key']}", headers=MASTER
    )
    assert status == 200 and [r["key_id"] for r in only] == [key["key_id"]]


@pytest.mark.parametrize(
    ("query", "status", "words"),
    [
        ("?group_by=customer", 400, "does not record end users"),
        ("?group_by=model", 400, "group_by must be team or api_key"),
        ("?start_date=June", 400, "start_date must be a date"),
        ("?start_date=2024-06-14&end_date=2024-06-13", 400, "is after end_date"),
    ],
)
async def test_global_report_refuses_what_it_cannot_answer(
    site: Site, query: str, status: int, words: str
) -> None:
    got, body, _ = await site.get("/global/spend/report" + query, headers=MASTER)
    assert got == status and words in body["error"]["message"]


async def test_team_report_has_every_day_for_the_chart(site: Site) -> None:
    team, key, _ = await _two_days(site)
    status, report, _ = await site.get(
        f"/team/spend/report?team_id={team['team_id']}", headers=MASTER
    )
    assert status == 200
    assert (report["start_date"], report["end_date"]) == ("2024-05-16", "2024-06-14")
    assert report["total_spend"] == 0.2500035 and report["team_alias"] == "QA Prod Bot"
    daily = report["daily"]
    assert len(daily) == 30 and daily[0]["date"] == "2024-05-16"
    assert [(d["date"], d["spend"]) for d in daily[-2:]] == [
        ("2024-06-13", 0.25),
        ("2024-06-14", 3.5e-06),
    ]
    assert all(d["spend"] == 0 for d in daily[:-2])
    assert report["keys"] == [
        {"key_id": key["key_id"], "key_alias": "bot", "spend": 0.2500035, "requests": 2,
         "prompt_tokens": 0, "completion_tokens": 0},
    ]  # fmt: skip
    assert [m["model"] for m in report["models"]] == ["llama3", "gpt-4o"]
    status, body, _ = await site.get("/team/spend/report?team_id=nope", headers=MASTER)
    assert status == 404
    status, body, _ = await site.get("/team/spend/report", headers=MASTER)
    assert status == 400 and body["error"]["param"] == "team_id"


async def test_key_report_by_plaintext_key_or_key_id(site: Site) -> None:
    _, key, _ = await _two_days(site)
    for lookup in (key["key"], key["key_id"]):
        status, report, _ = await site.get(
            f"/key/spend/report?key={lookup}&start_date=2024-06-14&end_date=2024-06-14",
            headers=MASTER,
        )
        assert status == 200
        assert report["key_id"] == key["key_id"] and report["total_spend"] == 3.5e-06
        assert report["daily"] == [
            {"date": "2024-06-14", "spend": 3.5e-06, "requests": 1, "prompt_tokens": 0,
             "completion_tokens": 0},
        ]  # fmt: skip


async def test_the_admin_page_is_served_with_a_strict_content_security_policy(
    site: Site,
) -> None:
    async with site.http.get(site.url + "/ui", allow_redirects=False) as answer:
        assert answer.status == 302 and answer.headers["Location"] == "/ui/"
    status, html, headers = await site.get("/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in html
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "http" not in html.replace("http://www.w3.org", "")  # nothing from elsewhere
    status, _, headers = await site.get("/ui/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    status, _, headers = await site.get("/ui/style.css")
    assert status == 200 and headers["Content-Type"].startswith("text/css")
    status, body, _ = await site.get("/ui/../README.md")
    assert status == 404
    status, body, _ = await site.get("/ui/secret.txt")
    assert status == 404 and body["error"]["code"] == 404
