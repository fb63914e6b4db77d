"""JWT credentials end to end: teams upserted from real signed JWTs with the default budget,
bad tokens denied through gRPC and through the real Envoy, and team-member limits across two
real ``budgetd serve`` replicas sharing Postgres and Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from envoy_harness import EnvoyProcess, free_ports, render_example
from envoy_messages import CHAT, PRICES
from fake_openai import FakeOpenAI
from harness import ADMIN, make_settings, running_server
from jwks_server import JwksServer, SigningKey, hmac_token, token_claims, unsigned_token
from replicas import start_replicas
from server.config import DefaultTeamSettings, JwtSettings
from server.gen.budgetd.v1 import budgetd_pb2 as pb

pytestmark = pytest.mark.timeout(120)

AUDIENCE = "budgetd-tests"
ISSUER = "https://idp.test"
SEED_MESSAGE = "Budget has been exceeded! Current cost: 3.5e-06, Max budget: 1e-09"
DEFAULTS = DefaultTeamSettings(
    team_id="default-settings", max_budget=1e-9, budget_duration="1d", team_member_rpm_limit=3
)


def claims_of(ttl: float = 300.0, **extra: object) -> dict[str, Any]:
    """A token's claims: iat/exp ``ttl`` seconds from now, and ``extra``."""
    return {**token_claims(ttl=ttl), **extra}


@dataclasses.dataclass
class Idp:
    """A signing key and the JWKS server that publishes it."""

    key: SigningKey
    jwks: JwksServer

    def token(self, team_id: str = "jwt-team", **claims: Any) -> str:
        base: dict[str, Any] = {"team_id": team_id, "aud": AUDIENCE, "iss": ISSUER, "sub": "alice"}
        return self.key.sign(claims_of(**{**base, **claims}))


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    key = SigningKey.rsa("kid-1")
    async with JwksServer([key]) as jwks:
        yield Idp(key, jwks)


def jwt_settings(idp: Idp, *, upsert: bool = True) -> JwtSettings:
    return JwtSettings(
        enabled=True,
        team_id_upsert=upsert,
        team_id_jwt_field="team_id",
        user_id_jwt_field="sub",
        public_key_url=idp.jwks.url,
        audience=AUDIENCE,
        issuer=ISSUER,
    )


def bad_tokens(idp: Idp) -> dict[str, str]:
    """The tokens invariant 4 says are never accepted, each with a word its denial names."""
    claims: dict[str, Any] = {"team_id": "jwt-team", "aud": AUDIENCE, "iss": ISSUER}
    impostor = SigningKey.rsa("kid-1")  # same kid, another key: a wrong signer
    return {
        "alg none": unsigned_token(claims_of(**claims)),
        "hs256 with the public key": hmac_token(
            idp.key.public_pem(), claims_of(**claims), headers={"kid": "kid-1"}
        ),
        "wrong signer": impostor.sign(claims_of(**claims)),
        "expired": idp.key.sign(claims_of(ttl=-120, **claims)),
        "wrong audience": idp.key.sign(claims_of(**{**claims, "aud": "someone-else"})),
        "wrong issuer": idp.key.sign(claims_of(**{**claims, "iss": "https://evil.test"})),
        "garbage": "not.a.jwt",
        "truncated": idp.token()[:-10],
    }


async def test_an_unknown_team_in_a_jwt_is_created_with_the_default_budget(
    tmp_path: Path, idp: Idp
) -> None:
    settings = make_settings(tmp_path, jwt=jwt_settings(idp), default_team_settings=(DEFAULTS,))
    async with running_server("embedded", settings) as running:
        token = idp.token("qa-prod-bot")
        first = await running.stub.CheckBudget(pb.CheckBudgetRequest(jwt=token))
        assert first.allowed and first.team_id == "qa-prod-bot" and first.user_id == "alice"
        team = await running.stub.GetTeam(pb.GetTeamRequest(team_id="qa-prod-bot"), metadata=ADMIN)
        assert (team.max_budget, team.budget_duration, team.team_member_rpm_limit) == (
            1e-9,
            "1d",
            3,
        )
        await running.stub.RecordSpend(
            pb.RecordSpendRequest(request_id="j1", reservation_id=first.reservation_id, cost=3.5e-6)
        )
        second = await running.stub.CheckBudget(pb.CheckBudgetRequest(jwt=token))
        assert (second.allowed, second.message) == (False, SEED_MESSAGE)
        assert second.reason == pb.BUDGET_EXCEEDED


async def test_without_upsert_an_unknown_team_is_a_denial(tmp_path: Path, idp: Idp) -> None:
    settings = make_settings(tmp_path, jwt=jwt_settings(idp, upsert=False))
    async with running_server("embedded", settings) as running:
        answer = await running.stub.CheckBudget(pb.CheckBudgetRequest(jwt=idp.token("nope")))
        assert (answer.allowed, answer.reason) == (False, pb.JWT_INVALID)
        assert "does not exist" in answer.message
        teams = await running.stub.ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
        assert list(teams.teams) == []


async def test_bad_tokens_are_denied_through_grpc_and_create_nothing(
    tmp_path: Path, idp: Idp
) -> None:
    settings = make_settings(tmp_path, jwt=jwt_settings(idp), default_team_settings=(DEFAULTS,))
    async with running_server("embedded", settings) as running:
        for name, token in bad_tokens(idp).items():
            answer = await running.stub.CheckBudget(pb.CheckBudgetRequest(jwt=token))
            assert (answer.allowed, answer.reason) == (False, pb.JWT_INVALID), name
            assert answer.message, name
        teams = await running.stub.ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
        assert list(teams.teams) == []


async def test_jwt_auth_off_denies_jwts(tmp_path: Path, idp: Idp) -> None:
    async with running_server("embedded", make_settings(tmp_path)) as running:
        answer = await running.stub.CheckBudget(pb.CheckBudgetRequest(jwt=idp.token()))
        assert (answer.allowed, answer.reason) == (False, pb.JWT_INVALID)
        assert "enable_jwt_auth" in answer.message


async def test_through_envoy_good_jwts_pass_and_bad_ones_get_401(tmp_path: Path, idp: Idp) -> None:
    upstream = FakeOpenAI()
    await upstream.start()
    settings = make_settings(
        tmp_path, prices=PRICES, jwt=jwt_settings(idp), default_team_settings=(DEFAULTS,)
    )
    try:
        async with running_server("embedded", settings) as running:
            listen_port, admin_port = free_ports(2)
            config = render_example(
                "envoy-grpc.yaml",
                budgetd_port=running.server.port,
                upstream_port=upstream.port,
                listen_port=listen_port,
                admin_port=admin_port,
            )
            async with EnvoyProcess(config, admin_port), aiohttp.ClientSession() as http:

                async def chat(token: str) -> tuple[int, dict[str, object]]:
                    async with http.post(
                        f"http://127.0.0.1:{listen_port}/chat/completions",
                        json=CHAT,
                        headers={"Authorization": f"Bearer {token}"},
                    ) as response:
                        return response.status, json.loads(await response.text() or "{}")

                status, _ = await chat(idp.token("via-envoy"))
                assert status == 200
                for name, token in bad_tokens(idp).items():
                    status, body = await chat(token)
                    assert status == 401, name
                    error = body["error"]
                    assert isinstance(error, dict) and error["type"] == "auth_error", name
                # The seed's walkthrough, with a JWT: the second request is the seed's 400.
                status, body = await chat(idp.token("via-envoy"))
                assert status == 400 and body["error"]["message"] == SEED_MESSAGE  # type: ignore[index]
    finally:
        await upstream.stop()


# -- two replicas -----------------------------------------------------------------------

SEED_JWT_YAML = """\
general_settings:
  enable_jwt_auth: true
litellm_jwtauth:
  team_id_upsert: true
  team_id_jwt_field: "team_id"
  user_id_jwt_field: "sub"
  # ... other jwt settings
litellm_settings:
  default_team_settings:
    - team_id: "default-settings"
      max_budget: 100.0
      budget_duration: "30d"
      team_member_rpm_limit: 3
      team_member_tpm_limit: 100
"""


async def test_two_replicas_upsert_one_team_and_share_member_limits(
    tmp_path: Path, idp: Idp, database_url: str, redis_url: str
) -> None:
    env = {"JWT_PUBLIC_KEY_URL": idp.jwks.url, "EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING": "true"}
    async with start_replicas(
        tmp_path,
        database_url=database_url,
        redis_url=redis_url,
        count=2,
        extra_env=env,
        extra_yaml=SEED_JWT_YAML,
    ) as cluster:
        stubs = [r.stub for r in cluster.replicas]

        def token(team: str, user: str) -> str:
            return idp.key.sign(token_claims(team_id=team, sub=user))

        # 8 concurrent first requests of a team nobody has seen, over both replicas.
        first = await asyncio.gather(
            *(
                stubs[i % 2].CheckBudget(pb.CheckBudgetRequest(jwt=token("upserted", f"user-{i}")))
                for i in range(8)
            )
        )
        assert all(a.allowed and a.team_id == "upserted" for a in first)
        teams = await stubs[0].ListTeams(pb.ListTeamsRequest(), metadata=ADMIN)
        assert [t.team_id for t in teams.teams] == ["upserted"]
        team = teams.teams[0]
        assert (team.max_budget, team.budget_duration, team.team_member_rpm_limit) == (
            100.0,
            "30d",
            3,
        )

        # team_member_rpm_limit: 3 holds across the two replicas.
        alice = token("limits", "alice")
        answers = []
        for i in range(5):
            answers.append(await stubs[i % 2].CheckBudget(pb.CheckBudgetRequest(jwt=alice)))
        assert [a.allowed for a in answers] == [True, True, True, False, False]
        fourth = answers[3]
        assert fourth.reason == pb.RATE_LIMITED and fourth.scope == pb.SCOPE_TEAM_MEMBER
        assert fourth.HasField("retry_after") and 0 < fourth.retry_after <= 20
        assert fourth.ratelimit_limit == 3 and fourth.ratelimit_remaining == 0
        bob = await stubs[1].CheckBudget(pb.CheckBudgetRequest(jwt=token("limits", "bob")))
        assert bob.allowed

        # team_member_tpm_limit: 100, charged from the estimate (max_tokens) at check time.
        carol = token("limits", "carol")
        tpm = []
        for i in range(3):
            tpm.append(
                await stubs[i % 2].CheckBudget(pb.CheckBudgetRequest(jwt=carol, max_tokens=60))
            )
        assert [a.allowed for a in tpm] == [True, True, False]
        assert tpm[2].reason == pb.RATE_LIMITED and tpm[2].ratelimit_limit in (3, 100)
        # Settling with the real usage gives the unused estimate back to carol's tpm.
        await stubs[0].RecordSpend(
            pb.RecordSpendRequest(
                request_id="carol-1",
                reservation_id=tpm[0].reservation_id,
                cost=1e-6,
                prompt_tokens=5,
                completion_tokens=5,
            )
        )
        again = await stubs[1].CheckBudget(pb.CheckBudgetRequest(jwt=carol, max_tokens=10))
        assert again.allowed, again.message
    assert cluster.returncodes == [0, 0]


async def test_multi_instance_rate_limiting_without_redis_stops_the_start(
    tmp_path: Path,
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("budgetd:\n  log_level: warning\n", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "budgetd"),
        "serve",
        "--config",
        str(config),
        "--grpc-addr",
        "127.0.0.1:0",
        env={
            "PATH": "/usr/bin:/bin",
            "BUDGETD_DATA_DIR": str(tmp_path / "d"),
            "EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING": "true",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"EXPERIMENTAL_MULTI_INSTANCE_RATE_LIMITING" in err and b"Redis" in err
