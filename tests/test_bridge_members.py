"""The bridge's LiteLLM admin endpoints for team members, blocking, key lifetimes and the new
team and key fields, against a real budgetd (embedded, and Postgres + Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest

from bridge_harness import CHAT, MASTER, running_bridge
from clients.bridge import Bridge
from clients.grpc_client import BudgetdClient, pb
from harness import BACKENDS, backend_urls, make_settings, running_server
from server.config import ModelPrice, Settings

PRICES = MappingProxyType({"llama3": ModelPrice(Decimal("1e-7"), Decimal("2e-7"))})
CHECK_PATH = "/envoy/authz/v1/chat/completions"


@dataclass
class Bridged:
    """budgetd + bridge, and an HTTP session to the bridge."""

    bridge: Bridge
    http: aiohttp.ClientSession

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, dict[str, Any]]:
        """(status, JSON body or {}) of one request to the bridge."""
        url = self.bridge.url + path
        async with self.http.request(method, url, headers=headers, **kw) as answer:
            text = await answer.text()
            return answer.status, json.loads(text) if text else {}

    async def admin(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to an admin endpoint with the master key; the answer (must be 200)."""
        status, answer = await self.call("POST", path, headers=MASTER, json=body)
        assert status == 200, (path, answer)
        return answer

    async def team_info(self, team_id: str) -> dict[str, Any]:
        status, info = await self.call("GET", f"/team/info?team_id={team_id}", headers=MASTER)
        assert status == 200, info
        return info

    async def check(self, key: str) -> tuple[int, dict[str, Any]]:
        """Ask the bridge's Envoy HTTP ext_authz endpoint about a chat request with ``key``."""
        return await self.call("POST", CHECK_PATH, headers={"x-api-key": key}, json=CHAT)

    async def reason(self, key: str) -> int:
        """CheckBudget's reason for ``key``, asked over gRPC (the HTTP body has no reason)."""
        async with BudgetdClient(self.bridge.config.target) as client:
            answer = await client.check_budget(pb.CheckBudgetRequest(api_key=key, model="llama3"))
        return answer.reason if not answer.allowed else pb.REASON_UNSPECIFIED


@pytest.fixture(params=BACKENDS)
def bridge_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, prices=PRICES, **urls)


@pytest.fixture
async def bridged(bridge_settings: tuple[str, Settings]) -> AsyncIterator[Bridged]:
    name, settings = bridge_settings
    async with (
        running_server(name, settings) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        yield Bridged(bridge, http)


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[Bridged]:
    """The embedded backend only (input errors need no second backend)."""
    settings = make_settings(tmp_path, prices=PRICES)
    async with (
        running_server("embedded", settings) as running,
        running_bridge(settings, running.target) as bridge,
        aiohttp.ClientSession() as http,
    ):
        yield Bridged(bridge, http)


MEMBER_DEFAULTS = {
    "team_member_budget": 0.5,
    "team_member_budget_duration": "1d",
    "team_member_rpm_limit": 10,
    "team_member_tpm_limit": 1000,
}


def by_user(memberships: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["user_id"]: m for m in memberships}


async def test_members_are_added_updated_listed_and_deleted(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "members", **MEMBER_DEFAULTS})
    team_id = team["team_id"]

    one = {"role": "user", "user_id": "u1"}
    added = await bridged.admin(
        "/team/member_add", {"team_id": team_id, "member": one, "max_budget_in_team": 0.25}
    )
    assert added["team_id"] == team_id and added["team_alias"] == "members"
    assert added["members_with_roles"] == [{"user_id": "u1", "user_email": None, "role": "user"}]
    assert [u["user_id"] for u in added["updated_users"]] == ["u1"]
    (u1,) = added["updated_team_memberships"]
    assert u1["user_id"] == "u1" and u1["team_id"] == team_id and u1["spend"] == 0.0
    assert u1["max_budget_in_team"] == 0.25 and u1["rpm_limit"] is None
    # What applies: its own budget, the team's defaults for the rest.
    assert u1["litellm_budget_table"] == {
        "max_budget": 0.25, "budget_duration": "1d", "rpm_limit": 10, "tpm_limit": 1000,
    }  # fmt: skip
    assert u1["budget_reset_at"].endswith("T00:00:00.000000Z")

    # A list of members: each is added.
    many = [{"user_id": "u2"}, {"role": "user", "user_id": "u3"}]
    added = await bridged.admin("/team/member_add", {"team_id": team_id, "member": many})
    assert [m["user_id"] for m in added["updated_team_memberships"]] == ["u2", "u3"]
    assert {m["user_id"] for m in added["members_with_roles"]} == {"u1", "u2", "u3"}
    for membership in added["updated_team_memberships"]:
        assert membership["max_budget_in_team"] is None
        assert membership["litellm_budget_table"]["max_budget"] == 0.5

    info = await bridged.team_info(team_id)
    assert {m["user_id"] for m in info["team_info"]["members_with_roles"]} == {"u1", "u2", "u3"}
    assert all(m["role"] == "user" for m in info["team_info"]["members_with_roles"])
    memberships = by_user(info["team_memberships"])
    assert set(memberships) == {"u1", "u2", "u3"}
    assert memberships["u1"]["litellm_budget_table"]["max_budget"] == 0.25
    assert memberships["u2"]["team_id"] == team_id and memberships["u2"]["budget_id"] is None

    # Update: own settings replace the defaults, exactly.
    change = {"team_id": team_id, "user_id": "u2", "max_budget_in_team": 0.000000001,
              "rpm_limit": 5, "tpm_limit": 7, "budget_duration": "30d"}  # fmt: skip
    updated = await bridged.admin("/team/member_update", change)
    assert updated["user_id"] == "u2" and updated["team_id"] == team_id
    assert updated["max_budget_in_team"] == 1e-09
    assert (updated["rpm_limit"], updated["tpm_limit"], updated["budget_duration"]) == (5, 7, "30d")
    assert updated["litellm_budget_table"] == {
        "max_budget": 1e-09, "budget_duration": "30d", "rpm_limit": 5, "tpm_limit": 7,
    }  # fmt: skip
    u2 = by_user((await bridged.team_info(team_id))["team_memberships"])["u2"]
    assert u2["max_budget_in_team"] == 1e-09 and u2["litellm_budget_table"]["rpm_limit"] == 5

    # null drops the member's own setting: the team's default applies again.
    back = {"team_id": team_id, "user_id": "u2", "max_budget_in_team": None, "rpm_limit": None}
    updated = await bridged.admin("/team/member_update", back)
    assert updated["max_budget_in_team"] is None and updated["rpm_limit"] is None
    assert updated["litellm_budget_table"]["max_budget"] == 0.5
    assert updated["litellm_budget_table"]["rpm_limit"] == 10
    assert updated["tpm_limit"] == 7  # left out: kept

    # Delete: the team is answered without the member.
    deleted = await bridged.admin("/team/member_delete", {"team_id": team_id, "user_id": "u1"})
    assert deleted["team_id"] == team_id
    assert {m["user_id"] for m in deleted["members_with_roles"]} == {"u2", "u3"}
    info = await bridged.team_info(team_id)
    assert set(by_user(info["team_memberships"])) == {"u2", "u3"}

    gone = {"team_id": team_id, "user_id": "u1"}
    status, body = await bridged.call("POST", "/team/member_update", headers=MASTER, json=gone)
    assert status == 404, body
    status, body = await bridged.call("POST", "/team/member_delete", headers=MASTER, json=gone)
    assert status == 404, body


async def test_a_members_budget_holds_for_the_keys_of_that_user(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "per user", "max_budget": 1.0})
    add = {"team_id": team["team_id"], "member": {"role": "user", "user_id": "u1"},
           "max_budget_in_team": 0.000000001}  # fmt: skip
    await bridged.admin("/team/member_add", add)
    mine = await bridged.admin("/key/generate", {"team_id": team["team_id"], "user_id": "u1"})
    theirs = await bridged.admin("/key/generate", {"team_id": team["team_id"], "user_id": "u2"})

    status, _ = await bridged.check(mine["key"])
    assert status == 200
    spend = {"request_id": "r1", "cost": 0.0000035}
    status, spent = await bridged.call(
        "POST", "/spend", headers={"Authorization": f"Bearer {mine['key']}"}, json=spend
    )
    assert status == 200, spent
    status, body = await bridged.check(mine["key"])
    assert status == 400 and "Budget has been exceeded" in body["error"]["message"], body
    assert await bridged.reason(mine["key"]) == pb.BUDGET_EXCEEDED
    assert (await bridged.check(theirs["key"]))[0] == 200  # u2 is no member: the team's budget

    (u1,) = (await bridged.team_info(team["team_id"]))["team_memberships"]
    assert u1["user_id"] == "u1" and u1["spend"] == 3.5e-06


async def test_member_add_is_all_or_nothing(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "t"})
    team_id = team["team_id"]
    await bridged.admin("/team/member_add", {"team_id": team_id, "member": {"user_id": "u1"}})

    again = {"team_id": team_id, "member": {"user_id": "u1"}}
    status, body = await bridged.call("POST", "/team/member_add", headers=MASTER, json=again)
    assert status == 409 and "u1" in body["error"]["message"]

    # u4 is added first, then u1 fails: u4 is taken out again.
    mixed = {"team_id": team_id, "member": [{"user_id": "u4"}, {"user_id": "u1"}]}
    status, body = await bridged.call("POST", "/team/member_add", headers=MASTER, json=mixed)
    assert status == 409, body
    info = await bridged.team_info(team_id)
    assert [m["user_id"] for m in info["team_info"]["members_with_roles"]] == ["u1"]


async def test_member_add_to_an_unknown_team_is_404(embedded: Bridged) -> None:
    body = {"team_id": "no-such-team", "member": {"role": "user", "user_id": "u1"}}
    status, answer = await embedded.call("POST", "/team/member_add", headers=MASTER, json=body)
    assert status == 404 and answer["error"]["code"] == 404
    assert "no-such-team" in answer["error"]["message"]


async def test_a_blocked_team_is_denied_until_unblocked(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "blockable"})
    key = (await bridged.admin("/key/generate", {"team_id": team["team_id"]}))["key"]
    assert (await bridged.check(key))[0] == 200

    blocked = await bridged.admin("/team/block", {"team_id": team["team_id"]})
    assert blocked["team_id"] == team["team_id"] and blocked["blocked"] is True
    status, body = await bridged.check(key)
    assert status == 400, body  # budgetd.deny_status, LiteLLM's auth_error
    assert body["error"]["type"] == "auth_error" and "blocked" in body["error"]["message"]
    assert await bridged.reason(key) == pb.TEAM_BLOCKED
    assert (await bridged.team_info(team["team_id"]))["team_info"]["blocked"] is True

    unblocked = await bridged.admin("/team/unblock", {"team_id": team["team_id"]})
    assert unblocked["blocked"] is False
    assert (await bridged.check(key))[0] == 200

    # Created blocked, and blocked through /team/update.
    born = await bridged.admin("/team/new", {"team_alias": "born blocked", "blocked": True})
    assert born["blocked"] is True
    other = (await bridged.admin("/key/generate", {"team_id": born["team_id"]}))["key"]
    assert await bridged.reason(other) == pb.TEAM_BLOCKED
    update = {"team_id": born["team_id"], "blocked": False}
    assert (await bridged.admin("/team/update", update))["data"]["blocked"] is False
    assert (await bridged.check(other))[0] == 200


async def test_a_blocked_key_is_denied_until_unblocked(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "keys"})
    issued = await bridged.admin("/key/generate", {"team_id": team["team_id"]})
    key, key_id = issued["key"], issued["key_id"]
    assert issued["blocked"] is False
    assert (await bridged.check(key))[0] == 200

    blocked = await bridged.admin("/key/block", {"key": key})  # the plaintext key
    assert blocked["key_id"] == key_id and blocked["blocked"] is True
    assert blocked["revoked"] is False and key not in json.dumps(blocked)
    status, body = await bridged.check(key)
    assert status == 400 and "blocked" in body["error"]["message"], body
    assert await bridged.reason(key) == pb.KEY_BLOCKED
    status, info = await bridged.call("GET", f"/key/info?key={key_id}", headers=MASTER)
    assert status == 200 and info["info"]["blocked"] is True

    unblocked = await bridged.admin("/key/unblock", {"key": key_id})  # or its key_id
    assert unblocked["blocked"] is False
    assert (await bridged.check(key))[0] == 200

    born = await bridged.admin("/key/generate", {"team_id": team["team_id"], "blocked": True})
    assert born["blocked"] is True and await bridged.reason(born["key"]) == pb.KEY_BLOCKED


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


async def test_key_duration_sets_expires(bridged: Bridged) -> None:
    team = await bridged.admin("/team/new", {"team_alias": "lifetimes"})
    before = time.time()
    issued = await bridged.admin("/key/generate", {"team_id": team["team_id"], "duration": "1h"})
    after = time.time()
    expires = parse_time(issued["expires"])
    assert before + 3600 - 1 <= expires <= after + 3600 + 1
    status, info = await bridged.call("GET", f"/key/info?key={issued['key']}", headers=MASTER)
    assert status == 200 and info["info"]["expires"] == issued["expires"]
    assert (await bridged.check(issued["key"]))[0] == 200

    forever = await bridged.admin("/key/generate", {"team_id": team["team_id"], "duration": None})
    assert forever["expires"] is None


async def test_model_max_budget_round_trips_exactly(bridged: Bridged) -> None:
    budgets = {
        "gpt-4o": {"budget_limit": 0.000000001, "time_period": "1d"},
        "llama3": {"budget_limit": 0.0001},
    }
    team = await bridged.admin("/team/new", {"team_alias": "models", "model_max_budget": budgets})
    expected = {
        "gpt-4o": {"budget_limit": 1e-09, "time_period": "1d"},
        "llama3": {"budget_limit": 0.0001, "time_period": None},
    }
    assert team["model_max_budget"] == expected
    info = await bridged.team_info(team["team_id"])
    assert info["team_info"]["model_max_budget"] == expected

    # /team/update replaces the whole map; null removes every per-model budget.
    replace = {"gpt-4o": {"budget_limit": 0.000000002, "time_period": "30d"}}
    update = {"team_id": team["team_id"], "model_max_budget": replace}
    updated = await bridged.admin("/team/update", update)
    assert updated["data"]["model_max_budget"] == {
        "gpt-4o": {"budget_limit": 2e-09, "time_period": "30d"}
    }
    update = {"team_id": team["team_id"], "model_max_budget": None}
    assert (await bridged.admin("/team/update", update))["data"]["model_max_budget"] == {}

    generate = {
        "team_id": team["team_id"],
        "model_max_budget": {"llama3": {"budget_limit": 0.000000001, "time_period": "1h"}},
        "soft_budget": 0.000000001,
        "rpm_limit": 7,
        "tpm_limit": 70,
        "user_id": "u1",
    }
    issued = await bridged.admin("/key/generate", generate)
    key_fields = {
        "model_max_budget": {"llama3": {"budget_limit": 1e-09, "time_period": "1h"}},
        "soft_budget": 1e-09,
        "rpm_limit": 7,
        "tpm_limit": 70,
        "user_id": "u1",
    }
    assert {name: issued[name] for name in key_fields} == key_fields
    status, info = await bridged.call("GET", f"/key/info?key={issued['key']}", headers=MASTER)
    assert status == 200 and {name: info["info"][name] for name in key_fields} == key_fields
    status, listed = await bridged.call(
        "GET", f"/key/list?team_id={team['team_id']}", headers=MASTER
    )
    assert status == 200
    (row,) = listed["keys"]
    assert {name: row[name] for name in key_fields} == key_fields


async def test_team_member_defaults_and_soft_budget_round_trip(bridged: Bridged) -> None:
    created = await bridged.admin(
        "/team/new",
        {"team_alias": "defaults", "soft_budget": 0.000000001, **MEMBER_DEFAULTS},
    )
    fields = {"soft_budget": 1e-09, **MEMBER_DEFAULTS}
    assert {name: created[name] for name in fields} == fields
    info = (await bridged.team_info(created["team_id"]))["team_info"]
    assert {name: info[name] for name in fields} == fields
    assert info["members_with_roles"] == []

    change = {
        "team_id": created["team_id"],
        "soft_budget": 0.25,
        "team_member_budget": 0.000000003,
        "team_member_budget_duration": "30d",
        "team_member_rpm_limit": 20,
        "team_member_tpm_limit": 2000,
    }
    data = (await bridged.admin("/team/update", change))["data"]
    assert {name: data[name] for name in change} == change
    # null: the members' budgets never reset; fields left out are kept.
    change = {"team_id": created["team_id"], "team_member_budget_duration": None}
    data = (await bridged.admin("/team/update", change))["data"]
    assert data["team_member_budget_duration"] is None and data["team_member_rpm_limit"] == 20
    assert data["team_member_budget"] == 3e-09 and data["soft_budget"] == 0.25
    # null on a setting removes it.
    change = {"team_id": created["team_id"], "soft_budget": None, "team_member_rpm_limit": None}
    data = (await bridged.admin("/team/update", change))["data"]
    assert data["soft_budget"] is None and data["team_member_rpm_limit"] is None
    assert data["team_member_budget"] == 3e-09
    change = {"team_id": created["team_id"], "soft_budget": 0.25, "team_member_rpm_limit": 20}
    await bridged.admin("/team/update", change)

    # A member without settings of its own gets the team's defaults.
    add = {"team_id": created["team_id"], "member": {"role": "user", "user_id": "u1"}}
    (member,) = (await bridged.admin("/team/member_add", add))["updated_team_memberships"]
    assert member["litellm_budget_table"] == {
        "max_budget": 3e-09, "budget_duration": None, "rpm_limit": 20, "tpm_limit": 2000,
    }  # fmt: skip


TEAM = "some-team"
U = {"user_id": "u"}


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "param"),
    [
        ("/team/member_add", {}, {"team_id": TEAM, "member": {"user_id": "u"}}, 401, None),
        ("/team/member_add", MASTER, {"member": {"user_id": "u"}}, 400, "team_id"),
        ("/team/member_add", MASTER, {"team_id": TEAM}, 400, "member"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": []}, 400, "member"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": "u"}, 400, "member"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": {"role": "admin", "user_id": "u"}},
         400, "member.role"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": {"user_email": "a@b.c"}},
         400, "member.user_id"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": [U, {"user_id": 5}]},
         400, "member[1].user_id"),
        ("/team/member_add", MASTER, {"team_id": TEAM, "member": [U, U]}, 400, "member[1].user_id"),
        ("/team/member_add", MASTER,
         {"team_id": TEAM, "member": {"user_id": "u"}, "max_budget_in_team": "lots"},
         400, "max_budget_in_team"),
        ("/team/member_update", MASTER, {"team_id": TEAM}, 400, "user_id"),
        ("/team/member_update", MASTER, {"team_id": TEAM, "user_id": "u", "rpm_limit": -1},
         400, "rpm_limit"),
        ("/team/member_update", MASTER, {"team_id": TEAM, "user_id": "u"}, 404, None),
        ("/team/member_delete", MASTER, {"user_id": "u"}, 400, "team_id"),
        ("/team/member_delete", {}, {"team_id": TEAM, "user_id": "u"}, 401, None),
        ("/team/block", MASTER, {}, 400, "team_id"),
        ("/team/block", MASTER, {"team_id": TEAM}, 404, None),
        ("/team/block", {}, {"team_id": TEAM}, 401, None),
        ("/team/unblock", MASTER, {"team_id": 5}, 400, "team_id"),
        ("/key/block", MASTER, {}, 400, "key"),
        ("/key/block", MASTER, {"key": "sk-unknown"}, 404, None),
        ("/key/unblock", MASTER, {"key": "key_unknown"}, 404, None),
        ("/key/unblock", {"Authorization": "Bearer nope"}, {"key": "sk-x"}, 401, None),
        ("/team/new", MASTER, {"model_max_budget": "lots"}, 400, "model_max_budget"),
        ("/team/new", MASTER, {"model_max_budget": {"gpt-4o": {"time_period": "1d"}}},
         400, "model_max_budget.gpt-4o.budget_limit"),
        ("/team/new", MASTER, {"model_max_budget": {"gpt-4o": {"budget_limit": "x"}}},
         400, "model_max_budget.gpt-4o.budget_limit"),
        ("/team/new", MASTER, {"model_max_budget": {"m": {"budget_limit": 1, "time_period": 2}}},
         400, "model_max_budget.m.time_period"),
        ("/team/new", MASTER, {"blocked": "yes"}, 400, "blocked"),
        ("/team/new", MASTER, {"team_member_rpm_limit": 1.5}, 400, "team_member_rpm_limit"),
        ("/team/update", MASTER, {"team_id": TEAM, "soft_budget": "lots"}, 400, "soft_budget"),
        ("/team/update", MASTER, {"team_id": TEAM, "blocked": None}, 400, "blocked"),
        ("/key/generate", MASTER, {"team_id": TEAM, "soft_budget": "x"}, 400, "soft_budget"),
        ("/key/generate", MASTER, {"team_id": TEAM, "tpm_limit": "x"}, 400, "tpm_limit"),
        ("/key/generate", MASTER, {"team_id": TEAM, "duration": 30}, 400, "duration"),
    ],
)  # fmt: skip
async def test_errors_name_the_field(
    embedded: Bridged,
    path: str,
    headers: dict[str, str],
    body: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    got, answer = await embedded.call("POST", path, headers=headers, json=body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    if param is not None:
        assert error["param"] == param and error["message"].startswith(param), error
