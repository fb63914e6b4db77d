"""The admin page (/ui/) in real headless Chromium (Debian's ``chromium``, driven by the
``playwright`` Python package, which never downloads a browser of its own).

A person's path through it: sign in with the master key, create a team with a budget,
create a key (shown once, copied with the button), see the team listed with its spend and
remaining budget and the day's bar on the chart, revoke the key. A screenshot is saved as
``tests/artifacts/admin-ui.png``.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from bridge_harness import running_bridge
from harness import MASTER_KEY, Running, make_settings, running_server
from server.gen.budgetd.v1 import budgetd_pb2 as pb

pytestmark = pytest.mark.timeout(120)

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def _chromium() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = _chromium()
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
        try:
            yield launched
        finally:
            await launched.close()


@dataclass
class UI:
    """The page in the browser, the bridge it talks to, and a client for setting the scene."""

    page: Page
    url: str
    http: aiohttp.ClientSession
    problems: list[str]

    async def post(self, path: str, body: dict[str, Any], key: str = MASTER_KEY) -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(self.url + path, headers=headers, json=body) as answer:
            assert answer.status == 200, await answer.text()
            return await answer.json()


@pytest.fixture
async def ui(tmp_path: Path, browser: Browser) -> AsyncIterator[tuple[UI, Running]]:
    settings = make_settings(tmp_path)
    async with (
        running_server("embedded", settings) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        context = await browser.new_context(
            viewport={"width": 1200, "height": 900},
            permissions=["clipboard-read", "clipboard-write"],
        )
        page = await context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on(
            "console",
            lambda message: problems.append(message.text) if message.type == "error" else None,
        )
        await page.goto(f"{bridge.url}/ui/")
        try:
            yield UI(page, bridge.url, http, problems), running
        finally:
            await context.close()


async def test_a_new_user_manages_teams_and_keys_from_the_admin_page(
    ui: tuple[UI, Running],
) -> None:
    site, running = ui
    page = site.page
    await _sign_in(site)
    row = await _create_team(page)
    key = await _create_key(page)

    # The key spends $2.50 through the bridge; the seed's team goes over its budget.
    await site.post("/spend", {"request_id": "ui-1", "cost": 2.5, "model": "llama3"}, key=key)
    seed = {"team_alias": "Seed team", "max_budget": 0.000000001, "budget_duration": "1d"}
    seed_team = await site.post("/team/new", seed)
    seed_key = (await site.post("/key/generate", {"team_id": seed_team["team_id"]}))["key"]
    await site.post("/spend", {"request_id": "seed-1", "cost": 0.0000035}, key=seed_key)
    await page.click("#refresh")
    await _see_spend_remaining_and_chart(page, row)

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "admin-ui.png"), full_page=True)

    # Once dismissed, the key is gone from the page for good.
    await page.click("#dismiss-key")
    await expect(page.locator("#new-key")).to_be_hidden()
    assert key not in await page.content()

    # Revoke it (two clicks, no dialog): checks with it are refused from then on.
    revoke = page.locator("#keys tbody tr", has_text="ci-bot").locator("button")
    await revoke.click()
    await expect(revoke).to_have_text("Confirm revoke")
    await revoke.click()
    await expect(page.locator("#no-keys")).to_be_visible()
    check = await running.stub.CheckBudget(pb.CheckBudgetRequest(api_key=key))
    assert not check.allowed and check.reason == pb.KEY_INVALID

    # Signing out forgets the master key.
    await page.click("#sign-out")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0
    assert site.problems == []


async def _sign_in(site: UI) -> None:
    page = site.page
    # A wrong key is refused with a message that says so.
    await page.fill("#master-key", "sk-not-the-key")
    await page.click("#login-form button")
    await expect(page.locator("#message")).to_contain_text("not budgetd's master key")
    await expect(page.locator("#app")).to_be_hidden()
    site.problems.clear()  # the browser logs the 401 itself
    await page.fill("#master-key", MASTER_KEY)
    await page.click("#login-form button")
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.locator("#no-teams")).to_be_visible()


async def _create_team(page: Page) -> Locator:
    """A team with a $10 daily budget; its row in the list."""
    await page.fill("#team-form [name=team_alias]", "QA Prod Bot")
    await page.fill("#team-form [name=max_budget]", "10")
    await page.select_option("#team-form [name=budget_duration]", "1d")
    await page.click("#team-form button")
    row = page.locator("#teams tbody tr", has_text="QA Prod Bot")
    await expect(row).to_contain_text("$10.00")
    await expect(page.locator("#detail-title")).to_have_text("QA Prod Bot")
    return row


async def _create_key(page: Page) -> str:
    """A key for the open team: shown once, copied with the button."""
    await page.fill("#key-form [name=key_alias]", "ci-bot")
    await page.click("#key-form button")
    await expect(page.locator("#new-key")).to_be_visible()
    key = await page.input_value("#new-key-value")
    assert key.startswith("sk-") and len(key) >= 25
    await page.click("#copy-key")
    await expect(page.locator("#copy-key")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == key
    await expect(page.locator("#keys tbody tr", has_text="ci-bot")).to_be_visible()
    return key


async def _see_spend_remaining_and_chart(page: Page, row: Locator) -> None:
    # The seed's team, over its budget: remaining is negative, as LiteLLM shows it.
    over = page.locator("#teams tbody tr", has_text="Seed team").locator("td")
    await expect(over.nth(3)).to_have_text("-$0.000003499")
    await expect(over.nth(3)).to_have_class("num over")
    cells = row.locator("td")
    await expect(cells.nth(2)).to_have_text("$2.50")  # spend
    await expect(cells.nth(3)).to_have_text("$7.50")  # remaining
    await expect(cells.nth(4)).to_contain_text("UTC (in ")  # reset time
    await expect(page.locator("#chart-range")).to_contain_text("$2.50 over the last 30 days")
    bars = page.locator("#chart rect.bar")
    await expect(bars).to_have_count(30)
    assert float(await bars.nth(29).get_attribute("height") or 0) > 100  # today's bar
