"""JWT credentials: signatures, the algorithm allow-list, keys from JWKS/PEM/HMAC, claims."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import jwt
import pytest

from jwks_server import JwksServer, SigningKey, hmac_token, token_claims, unsigned_token
from server.clock import FakeClock
from server.config import JwtSettings
from server.jwt_auth import JwtVerifier
from server.jwt_types import DEFAULT_ALGORITHMS, JwtIdentity, JwtInvalid

SECRET = "an-hmac-secret-that-is-long-enough-for-hs256"
AUDIENCE = "budgetd"
ISSUER = "https://idp.example.com/"
NOW = 1_700_000_000.0


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey.ec("ec-1")


@pytest.fixture(scope="module")
def ed_key() -> SigningKey:
    return SigningKey.ed25519("ed-1")


@pytest.fixture(scope="module")
def other_rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-2")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def jwks(
    rsa_key: SigningKey, ec_key: SigningKey, ed_key: SigningKey
) -> AsyncIterator[JwksServer]:
    async with JwksServer([rsa_key, ec_key, ed_key]) as server:
        yield server


@asynccontextmanager
async def verifier(
    clock: FakeClock,
    fetch: Callable[[str], Awaitable[object]] | None = None,
    **settings: Any,
) -> AsyncIterator[JwtVerifier]:
    async with JwtVerifier(
        JwtSettings(enabled=True, **settings), clock=clock, fetch=fetch, fetch_timeout=2.0
    ) as made:
        yield made


def claims_at(clock: FakeClock, ttl: float = 300, **extra: Any) -> dict[str, Any]:
    return token_claims(ttl=ttl, now=clock.now(), **extra)


async def rejected(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(JwtInvalid) as caught:
        await verifier.verify(token)
    return str(caught.value)


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for something a background task does (a JWKS refresh)."""
    deadline = time.monotonic() + within
    while True:
        if condition():
            return
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def b64(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


# -- valid tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec", "ed"])
async def test_valid_tokens_from_a_jwks(
    which: str,
    rsa_key: SigningKey,
    ec_key: SigningKey,
    ed_key: SigningKey,
    jwks: JwksServer,
    clock: FakeClock,
) -> None:
    key = {"rsa": rsa_key, "ec": ec_key, "ed": ed_key}[which]
    async with verifier(clock, public_key_url=jwks.url, team_id_jwt_field="team_id") as v:
        identity = await v.verify(key.sign(claims_at(clock, team_id="t-1", sub="u")))
    assert identity.team_id == "t-1"
    assert identity.user_id == ""
    assert identity.claims["sub"] == "u"


async def test_rsa_key_without_alg_verifies_every_rsa_algorithm(clock: FakeClock) -> None:
    key = SigningKey.rsa("plain")
    async with (
        JwksServer([key.public_jwk(with_alg=False)]) as server,
        verifier(clock, public_key_url=server.url) as v,
    ):
        for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            await v.verify(key.sign(claims_at(clock), alg=alg))


async def test_token_without_kid_is_tried_with_every_fitting_key(
    rsa_key: SigningKey, other_rsa_key: SigningKey, clock: FakeClock
) -> None:
    async with (
        JwksServer([other_rsa_key, rsa_key]) as server,
        verifier(clock, public_key_url=server.url) as v,
    ):
        await v.verify(rsa_key.sign(claims_at(clock), headers={"kid": None}))


async def test_token_without_exp_is_accepted(rsa_key: SigningKey, clock: FakeClock) -> None:
    # As LiteLLM does: whether tokens expire is the identity provider's decision.
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        await v.verify(rsa_key.sign({"sub": "forever"}))


async def test_bearer_whitespace_is_ignored(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        await v.verify(f"  {rsa_key.sign(claims_at(clock))}\n")


# -- the bad-token table ---------------------------------------------------------------------


def _tampered(token: str) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{b64({'sub': 'admin', 'exp': NOW + 300})}.{signature}"


BadToken = Callable[[SigningKey, SigningKey, SigningKey], str]
NOW_CLAIMS = {"iat": int(NOW), "exp": int(NOW) + 300, "aud": AUDIENCE, "iss": ISSUER}


def _claims(**changes: Any) -> dict[str, Any]:
    merged = {**NOW_CLAIMS, **changes}
    return {name: value for name, value in merged.items() if value is not None}


BAD_TOKENS: dict[str, tuple[BadToken, str]] = {
    "alg none": (lambda k, o, e: unsigned_token(_claims()), "JWT algorithm 'none' is not allowed"),
    "alg NONE": (
        lambda k, o, e: unsigned_token(_claims(), {"alg": "NONE"}),
        "JWT algorithm 'NONE' is not allowed",
    ),
    "alg none with a signature": (
        lambda k, o, e: unsigned_token(_claims()) + "c2ln",
        "JWT algorithm 'none' is not allowed",
    ),
    "HS256 signed with the public key PEM": (
        lambda k, o, e: hmac_token(k.public_pem(), _claims(), headers={"kid": k.kid}),
        "JWT algorithm 'HS256' is not allowed",
    ),
    "wrong signer, same kid": (
        lambda k, o, e: SigningKey(k.kid, "RS256", o.private_key).sign(_claims()),
        "JWT signature is invalid",
    ),
    "tampered payload": (lambda k, o, e: _tampered(k.sign(_claims())), "JWT signature is invalid"),
    "signature of another token": (
        lambda k, o, e: ".".join(
            [*k.sign(_claims()).split(".")[:2], k.sign(_claims(sub="x")).split(".")[2]]
        ),
        "JWT signature is invalid",
    ),
    "expired": (lambda k, o, e: k.sign(_claims(exp=int(NOW) - 31)), "JWT has expired"),
    "nbf in the future": (
        lambda k, o, e: k.sign(_claims(nbf=int(NOW) + 31)),
        "JWT is not valid yet (nbf",
    ),
    "iat in the future": (
        lambda k, o, e: k.sign(_claims(iat=int(NOW) + 3600)),
        "JWT is not valid yet (iat",
    ),
    "exp not a number": (
        lambda k, o, e: k.sign(_claims(exp="tomorrow")),
        "JWT claim 'exp' must be a number",
    ),
    "wrong aud": (lambda k, o, e: k.sign(_claims(aud="other")), "JWT audience is not 'budgetd'"),
    "wrong aud list": (
        lambda k, o, e: k.sign(_claims(aud=["a", "b"])),
        "JWT audience is not 'budgetd'",
    ),
    "aud of the wrong type": (
        lambda k, o, e: k.sign(_claims(aud=5)),
        "JWT claim 'aud' must be a string or a list of strings",
    ),
    "missing aud": (lambda k, o, e: k.sign(_claims(aud=None)), "JWT has no aud claim"),
    "wrong iss": (
        lambda k, o, e: k.sign(_claims(iss="https://evil.example.com/")),
        "JWT issuer is not 'https://idp.example.com/'",
    ),
    "missing iss": (lambda k, o, e: k.sign(_claims(iss=None)), "JWT has no iss claim"),
    "unknown kid": (
        lambda k, o, e: o.sign(_claims(), headers={"kid": "k9"}),
        "JWT key id 'k9' is not in the JWKS",
    ),
    "kid of a key for another alg": (
        lambda k, o, e: k.sign(_claims(), alg="RS512"),
        "JWT key id 'rsa-1' is for RS256, not RS512",
    ),
    "EC token naming an RSA key": (
        lambda k, o, e: e.sign(_claims(), headers={"kid": k.kid}),
        "JWT key id 'rsa-1' is for RS256, not ES256",
    ),
    "alg off the allow-list": (
        lambda k, o, e: hmac_token("x" * 64, _claims(), "HS512"),
        "JWT algorithm 'HS512' is not allowed",
    ),
    "unsupported critical header": (
        lambda k, o, e: k.sign(_claims(), headers={"crit": ["exp"], "exp": 1}),
        "JWT is malformed (Unsupported critical extension: exp)",
    ),
    "empty": (lambda k, o, e: "", "JWT is malformed (empty)"),
    "one word": (lambda k, o, e: "not-a-jwt", "JWT is malformed (expected 3 dot-separated"),
    "two segments": (lambda k, o, e: "a.b", "JWT is malformed (expected 3"),
    "five segments (JWE)": (lambda k, o, e: "a.b.c.d.e", "JWT is malformed (expected 3"),
    "three garbage segments": (lambda k, o, e: "a.b.c", "JWT is malformed"),
    "bad base64": (lambda k, o, e: "!!!.???.***", "JWT is malformed"),
    "non-ASCII": (lambda k, o, e: "é.é.é", "JWT is malformed"),
    "header not JSON": (lambda k, o, e: "bm90IGpzb24.e30.c2ln", "JWT is malformed"),
    "header a list": (lambda k, o, e: f"{b64([1])}.e30.c2ln", "JWT is malformed"),
    "header without alg": (lambda k, o, e: f"{b64({'typ': 'JWT'})}.e30.c2ln", "names no alg"),
    "alg not a string": (lambda k, o, e: f"{b64({'alg': 256})}.e30.c2ln", "names no alg"),
    "kid not a string": (
        lambda k, o, e: f"{b64({'alg': 'RS256', 'kid': 7})}.e30.c2ln",
        "JWT is malformed (Key ID header parameter must be a string)",
    ),
    "bad signature base64": (
        lambda k, o, e: k.sign(_claims()).rsplit(".", 1)[0] + ".***",
        "JWT is malformed",
    ),
    "signed payload not a JSON object": (
        lambda k, o, e: jwt.PyJWS().encode(b"[1, 2]", k.private_key, "RS256", {"kid": k.kid}),
        "JWT is malformed (Invalid payload string: must be a json object)",
    ),
    "very long": (lambda k, o, e: "a" * 40_000 + ".b.c", "longer than 32768 characters"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_bad_tokens_are_rejected_saying_why(
    case: str,
    rsa_key: SigningKey,
    other_rsa_key: SigningKey,
    ec_key: SigningKey,
    jwks: JwksServer,
    clock: FakeClock,
) -> None:
    make, fragment = BAD_TOKENS[case]
    async with verifier(clock, public_key_url=jwks.url, audience=AUDIENCE, issuer=ISSUER) as v:
        assert (await v.verify(rsa_key.sign(_claims()))).claims["aud"] == AUDIENCE
        message = await rejected(v, make(rsa_key, other_rsa_key, ec_key))
    assert fragment in message
    assert message.startswith("JWT")


async def test_non_string_token_is_rejected(clock: FakeClock, rsa_key: SigningKey) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        assert await rejected(v, None) == "JWT is malformed (not a string)"  # type: ignore[arg-type]


# -- time: the injected clock and the leeway ------------------------------------------------


async def test_exp_and_nbf_use_the_injected_clock_with_leeway(
    rsa_key: SigningKey, clock: FakeClock
) -> None:
    token = rsa_key.sign({"nbf": int(NOW) + 20, "exp": int(NOW) + 100})
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        await v.verify(token)  # nbf 20 s ahead: within the default 30 s leeway
        clock.advance(129)
        await v.verify(token)  # 29 s past exp: still within the leeway
        clock.advance(1)
        assert await rejected(v, token) == "JWT has expired"
        clock.set(NOW - 11)
        assert "not valid yet" in await rejected(v, token)  # nbf 31 s ahead


async def test_leeway_is_configurable(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem(), leeway=0.0) as v:
        await v.verify(rsa_key.sign({"exp": int(NOW) + 1}))
        assert await rejected(v, rsa_key.sign({"exp": int(NOW)})) == "JWT has expired"
        assert "not valid yet" in await rejected(v, rsa_key.sign({"nbf": int(NOW) + 1}))
    async with verifier(clock, public_key_pem=rsa_key.public_pem(), leeway=300.0) as v:
        await v.verify(rsa_key.sign({"exp": int(NOW) - 299}))


# -- HS/RS: the HMAC secret is the only key for HS*, and only for HS* -----------------------


async def test_hs256_needs_a_configured_secret(rsa_key: SigningKey, clock: FakeClock) -> None:
    token = hmac_token(SECRET, claims_at(clock))
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        assert "JWT algorithm 'HS256' is not allowed" in await rejected(v, token)
    # Even listed in a hand-built allow-list, HS256 is not verified without a secret.
    algorithms = (*DEFAULT_ALGORITHMS, "HS256")
    async with verifier(clock, public_key_pem=rsa_key.public_pem(), algorithms=algorithms) as v:
        assert "needs budgetd.jwt_hmac_secret" in await rejected(v, token)


async def test_hmac_secret_verifies_hs_tokens_only(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with verifier(clock, hmac_secret=SECRET, algorithms=("HS256",)) as v:
        identity = await v.verify(hmac_token(SECRET, claims_at(clock, sub="svc")))
        assert identity.claims["sub"] == "svc"
        assert await rejected(v, hmac_token("x" * 40, claims_at(clock))) == (
            "JWT signature is invalid"
        )
        # An RS token is off this allow-list; so is HS384, though the secret is the same.
        assert "JWT algorithm 'RS256' is not allowed" in await rejected(
            v, rsa_key.sign(claims_at(clock))
        )
        assert "JWT algorithm 'HS384' is not allowed" in await rejected(
            v, hmac_token(SECRET, claims_at(clock), "HS384")
        )


async def test_hs_and_rs_together_never_cross(rsa_key: SigningKey, clock: FakeClock) -> None:
    # The allow-list the config builds when a secret is set besides a public key.
    algorithms = (*DEFAULT_ALGORITHMS, "HS256")
    async with verifier(
        clock, public_key_pem=rsa_key.public_pem(), hmac_secret=SECRET, algorithms=algorithms
    ) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        await v.verify(hmac_token(SECRET, claims_at(clock)))
        # The classic confusion: HS256 "signed" with the RSA public key's PEM.
        forged = hmac_token(rsa_key.public_pem(), claims_at(clock), headers={"kid": "rsa-1"})
        assert await rejected(v, forged) == "JWT signature is invalid"
        # ...and an RS256 token is never checked against the secret.
        assert await rejected(v, SigningKey.rsa("x").sign(claims_at(clock))) == (
            "JWT signature is invalid"
        )


async def test_oct_keys_in_a_jwks_are_never_used(clock: FakeClock) -> None:
    shared = "a-secret-published-in-a-jwks-by-mistake!"
    oct_jwk = {
        "kty": "oct",
        "kid": "h1",
        "alg": "HS256",
        "k": base64.urlsafe_b64encode(shared.encode()).rstrip(b"=").decode(),
    }
    async with (
        JwksServer([oct_jwk]) as server,
        verifier(
            clock,
            public_key_url=server.url,
            hmac_secret=SECRET,
            algorithms=(*DEFAULT_ALGORITHMS, "HS256"),
        ) as v,
    ):
        token = hmac_token(shared, claims_at(clock), headers={"kid": "h1"})
        assert await rejected(v, token) == "JWT signature is invalid"


# -- PEM keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rsa", "ec", "ed"])
async def test_pem_public_key(
    which: str, rsa_key: SigningKey, ec_key: SigningKey, ed_key: SigningKey, clock: FakeClock
) -> None:
    key = {"rsa": rsa_key, "ec": ec_key, "ed": ed_key}[which]
    async with verifier(clock, public_key_pem=key.public_pem()) as v:
        await v.verify(key.sign(claims_at(clock)))  # its kid does not matter
        await v.verify(key.sign(claims_at(clock), headers={"kid": None}))
        stranger = {"rsa": SigningKey.rsa, "ec": SigningKey.ec, "ed": SigningKey.ed25519}[which]
        assert await rejected(v, stranger(key.kid).sign(claims_at(clock))) == (
            "JWT signature is invalid"
        )


async def test_pem_key_of_another_type_is_not_tried(
    rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        message = await rejected(v, ec_key.sign(claims_at(clock)))
    assert message == "JWT cannot be verified: no configured key fits algorithm 'ES256'"


async def test_pem_with_escaped_newlines(rsa_key: SigningKey, clock: FakeClock) -> None:
    one_line = rsa_key.public_pem().strip().replace("\n", "\\n")
    async with verifier(clock, public_key_pem=one_line) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))


def test_unusable_pem_is_refused_at_construction(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="is not a PEM public key"):
        JwtVerifier(JwtSettings(public_key_pem="hello"), clock=clock)


async def test_no_key_source_configured(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with verifier(clock) as v:
        message = await rejected(v, rsa_key.sign(claims_at(clock)))
    assert message.startswith("JWT cannot be verified: no key source is configured")


# -- JWKS: rotation, rate limits, stale keys, TTL, several URLs -----------------------------


async def test_concurrent_first_requests_share_one_fetch(
    rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url) as v:
        tokens = [rsa_key.sign(claims_at(clock, n=n)) for n in range(20)]
        await asyncio.gather(*(v.verify(token) for token in tokens))
    assert jwks.requests == 1


async def test_rotation_new_kid_is_fetched(
    rsa_key: SigningKey, other_rsa_key: SigningKey, clock: FakeClock
) -> None:
    async with JwksServer([rsa_key]) as server, verifier(clock, public_key_url=server.url) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        assert server.requests == 1
        server.set_keys([rsa_key, other_rsa_key])
        clock.advance(5)  # the least time between two fetches
        await v.verify(other_rsa_key.sign(claims_at(clock)))
        assert server.requests == 2
        # The old key is still served, so tokens signed with it still pass.
        await v.verify(rsa_key.sign(claims_at(clock)))
        # Then the old key is retired: its tokens fail once the set is fetched again.
        server.set_keys([other_rsa_key])
        clock.advance(5)
        await v.refresh()
        assert "JWT key id 'rsa-1' is not in the JWKS" in await rejected(
            v, rsa_key.sign(claims_at(clock))
        )


async def test_unknown_kid_flood_does_not_hammer_the_jwks(
    rsa_key: SigningKey, other_rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        clock.advance(10)
        forged = [
            other_rsa_key.sign(claims_at(clock), headers={"kid": f"k{n}"}) for n in range(200)
        ]
        messages = await asyncio.gather(*(rejected(v, token) for token in forged))
        assert all("is not in the JWKS" in message for message in messages)
        assert jwks.requests == 2  # one refetch for the whole flood
        for token in forged[:50]:
            await rejected(v, token)
        assert jwks.requests == 2  # and none until the interval has passed
        clock.advance(5)
        await rejected(v, forged[0])
        assert jwks.requests == 3


async def test_known_kid_with_a_bad_signature_does_not_refetch(
    rsa_key: SigningKey, other_rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        clock.advance(60)
        forged = SigningKey(rsa_key.kid, "RS256", other_rsa_key.private_key)
        assert await rejected(v, forged.sign(claims_at(clock))) == "JWT signature is invalid"
    assert jwks.requests == 1


async def test_stale_keys_are_served_while_the_jwks_fails(
    rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url, public_key_ttl=60.0) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        jwks.fail = True
        clock.advance(61)  # the TTL has passed: a refresh starts, and fails
        await v.verify(rsa_key.sign(claims_at(clock)))
        await until(lambda: jwks.requests == 2)
        await v.verify(rsa_key.sign(claims_at(clock)))  # the failed refresh kept the keys
        message = await rejected(v, rsa_key.sign(claims_at(clock), headers={"kid": "new"}))
        assert message == (
            f"JWT key id 'new' is not in the JWKS (JWKS at {jwks.url} could not be fetched: "
            "HTTP 500)"
        )
        await jwks.stop()  # the host goes away altogether
        clock.advance(61)
        await v.verify(rsa_key.sign(claims_at(clock)))
        await until(lambda: v._jwks._refreshing is None)
        await v.verify(rsa_key.sign(claims_at(clock)))
        await jwks.start()
        jwks.fail = False
        clock.advance(5)
        await v.verify(rsa_key.sign(claims_at(clock)))
        await until(lambda: jwks.requests == 3)


async def test_a_hung_jwks_host_does_not_hold_requests_with_cached_keys(
    rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url, public_key_ttl=60.0) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        jwks.hang = True
        clock.advance(61)
        started = time.monotonic()
        for _ in range(10):
            await v.verify(rsa_key.sign(claims_at(clock)))
        assert time.monotonic() - started < 1.0
        await until(lambda: jwks.requests == 2)
        jwks.hang = False


async def test_unreachable_jwks_without_cache(rsa_key: SigningKey, clock: FakeClock) -> None:
    server = JwksServer([rsa_key])
    await server.start()
    await server.stop()  # a port nothing listens on
    async with verifier(clock, public_key_url=server.url) as v:
        message = await rejected(v, rsa_key.sign(claims_at(clock)))
        assert message.startswith(f"JWKS at {server.url} could not be fetched: ")
        await server.start()
        try:
            # Within the interval, the failure is answered without asking again...
            assert await rejected(v, rsa_key.sign(claims_at(clock))) == message
            assert server.requests == 0
            clock.advance(5)  # ...then the next token fetches
            await v.verify(rsa_key.sign(claims_at(clock)))
            assert server.requests == 1
        finally:
            await server.stop()


async def test_failing_jwks_without_cache(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with JwksServer([rsa_key]) as server, verifier(clock, public_key_url=server.url) as v:
        server.fail = True
        message = await rejected(v, rsa_key.sign(claims_at(clock)))
        assert message == f"JWKS at {server.url} could not be fetched: HTTP 500"


async def test_ttl_expiry_refetches(
    rsa_key: SigningKey, other_rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    async with verifier(clock, public_key_url=jwks.url, public_key_ttl=600.0) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        clock.advance(599)
        await v.verify(rsa_key.sign(claims_at(clock)))
        await asyncio.sleep(0.05)
        assert jwks.requests == 1
        jwks.set_keys([other_rsa_key])  # rsa-1 is withdrawn
        clock.advance(2)
        await v.verify(rsa_key.sign(claims_at(clock)))  # cached keys answer meanwhile
        await until(lambda: jwks.requests == 2)
        await until(lambda: v._jwks._refreshing is None)
        assert "not in the JWKS" in await rejected(v, rsa_key.sign(claims_at(clock)))
        await v.verify(other_rsa_key.sign(claims_at(clock)))


async def test_two_comma_separated_jwks_urls(
    rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock
) -> None:
    async with JwksServer([rsa_key]) as first, JwksServer([ec_key]) as second:
        urls = f"{first.url}, {second.url}"
        async with verifier(clock, public_key_url=urls) as v:
            await v.verify(rsa_key.sign(claims_at(clock)))
            await v.verify(ec_key.sign(claims_at(clock)))
        assert (first.requests, second.requests) == (1, 1)
        second.fail = True
        async with verifier(clock, public_key_url=urls) as v:
            await v.verify(rsa_key.sign(claims_at(clock)))  # one URL down: the other works
            message = await rejected(v, ec_key.sign(claims_at(clock)))
        assert message == (
            f"JWT key id 'ec-1' is not in the JWKS (JWKS at {second.url} could not be "
            "fetched: HTTP 500)"
        )


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing with it
async def test_jwks_entries_that_cannot_be_used_are_skipped(
    rsa_key: SigningKey, ec_key: SigningKey, clock: FakeClock
) -> None:
    weak = SigningKey.rsa("weak", bits=1024)
    entries: list[object] = [
        {"kty": "RSA", "kid": "broken", "n": "!!"},
        "not a key",
        {"kty": "RSA", "kid": 7, "n": "AQAB", "e": "AQAB"},
        {"kty": "RSA", "kid": "for-encryption", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
        weak.public_jwk(),
        ec_key.public_jwk(use="enc"),
        ec_key.public_jwk(kid="verify-less", key_ops=["encrypt"]),
        rsa_key.public_jwk(),
    ]
    async with JwksServer() as server, verifier(clock, public_key_url=server.url) as v:
        server.document = {"keys": entries}
        await v.verify(rsa_key.sign(claims_at(clock)))
        assert "not in the JWKS" in await rejected(v, weak.sign(claims_at(clock)))
        assert "not in the JWKS" in await rejected(v, ec_key.sign(claims_at(clock)))


async def test_injected_fetch(rsa_key: SigningKey, clock: FakeClock) -> None:
    calls: list[str] = []
    document: object = rsa_key.public_jwk()  # a single JWK, as LiteLLM accepts

    async def fetch(url: str) -> object:
        calls.append(url)
        if isinstance(document, Exception):
            raise document
        return document

    url = "https://idp.example.com/jwks"
    async with verifier(clock, fetch=fetch, public_key_url=url) as v:
        await v.verify(rsa_key.sign(claims_at(clock)))
        assert calls == [url]
    document = {"keys": "nope"}
    async with verifier(clock, fetch=fetch, public_key_url=url) as v:
        assert "(no 'keys' list)" in await rejected(v, rsa_key.sign(claims_at(clock)))
    document = OSError("connection reset")
    async with verifier(clock, fetch=fetch, public_key_url=url) as v:
        assert await rejected(v, rsa_key.sign(claims_at(clock))) == (
            f"JWKS at {url} could not be fetched: connection reset"
        )


async def test_close_stops_a_fetch_in_flight(
    rsa_key: SigningKey, jwks: JwksServer, clock: FakeClock
) -> None:
    jwks.hang = True
    v = JwtVerifier(JwtSettings(public_key_url=jwks.url), clock=clock)
    await v.start()
    pending = asyncio.create_task(v.verify(rsa_key.sign(claims_at(clock))))
    await until(lambda: jwks.requests == 1)
    await asyncio.wait_for(v.close(), 2.0)
    with pytest.raises(JwtInvalid, match="could not be fetched"):
        await asyncio.wait_for(pending, 2.0)
    jwks.hang = False


# -- identity --------------------------------------------------------------------------------


def _identity_cases() -> Iterator[tuple[str, dict[str, Any], dict[str, Any], tuple[str, str]]]:
    yield "team field", {"team_id_jwt_field": "team_id"}, {"team_id": "t1"}, ("t1", "")
    yield "integer team", {"team_id_jwt_field": "team_id"}, {"team_id": 42}, ("42", "")
    yield (
        "dotted path",
        {"team_id_jwt_field": "realm.team"},
        {"realm": {"team": "t2"}},
        ("t2", ""),
    )
    yield (
        "claim name with dots wins",
        {"team_id_jwt_field": "https://example.com/team"},
        {"https://example.com/team": "t3"},
        ("t3", ""),
    )
    yield (
        "team_ids list",
        {"team_id_jwt_field": "team_id", "team_ids_jwt_field": "groups"},
        {"groups": ["g1", "g2"]},
        ("g1", ""),
    )
    yield (
        "team field beats team_ids",
        {"team_id_jwt_field": "team_id", "team_ids_jwt_field": "groups"},
        {"team_id": "t4", "groups": ["g1"]},
        ("t4", ""),
    )
    yield (
        "team_id_default",
        {"team_id_jwt_field": "team_id", "team_ids_jwt_field": "groups", "team_id_default": "d"},
        {"groups": []},
        ("d", ""),
    )
    yield (
        "user",
        {"user_id_jwt_field": "sub", "team_id_jwt_field": "org.team"},
        {"sub": "u1", "org": "not-a-mapping"},
        ("", "u1"),
    )
    yield "nothing configured", {}, {"sub": "u1", "team_id": "t"}, ("", "")


@pytest.mark.parametrize(
    ("fields", "payload", "expected"),
    [case[1:] for case in _identity_cases()],
    ids=[case[0] for case in _identity_cases()],
)
async def test_identity(
    fields: dict[str, Any],
    payload: dict[str, Any],
    expected: tuple[str, str],
    rsa_key: SigningKey,
    clock: FakeClock,
) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem(), **fields) as v:
        identity = await v.verify(rsa_key.sign(claims_at(clock, **payload)))
    assert (identity.team_id, identity.user_id) == expected


@pytest.mark.parametrize(
    ("fields", "payload", "message"),
    [
        ({"team_id_jwt_field": "team_id"}, {"team_id": 1.5}, "'team_id' must be a string or"),
        ({"team_id_jwt_field": "team_id"}, {"team_id": True}, "(got a boolean)"),
        ({"team_id_jwt_field": "a.b"}, {"a": {"b": ["x"]}}, "JWT claim 'a.b' must be a string"),
        ({"team_ids_jwt_field": "groups"}, {"groups": "g1"}, "'groups' must be a list of team"),
        ({"team_ids_jwt_field": "groups"}, {"groups": [{"id": 1}]}, "'groups[0]' must be a"),
        ({"user_id_jwt_field": "sub"}, {"sub": {"id": 1}}, "JWT claim 'sub' must be a string"),
    ],
)
async def test_identity_claims_of_the_wrong_type(
    fields: dict[str, Any],
    payload: dict[str, Any],
    message: str,
    rsa_key: SigningKey,
    clock: FakeClock,
) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem(), **fields) as v:
        assert message in await rejected(v, rsa_key.sign(claims_at(clock, **payload)))


async def test_identity_claims_are_read_only(rsa_key: SigningKey, clock: FakeClock) -> None:
    async with verifier(clock, public_key_pem=rsa_key.public_pem()) as v:
        identity = await v.verify(rsa_key.sign(claims_at(clock, sub="u")))
    assert isinstance(identity, JwtIdentity)
    with pytest.raises(TypeError):
        identity.claims["sub"] = "admin"  # type: ignore[index]
