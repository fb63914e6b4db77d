"""JWT credentials: verify a bearer JWT (PyJWT) and read the team and user it names.

Where the keys come from (``JwtSettings``):

* ``JWT_PUBLIC_KEY_URL``: one or more comma-separated JWKS URLs whose keys are merged. They are
  fetched with aiohttp and kept for ``litellm_jwtauth.public_key_ttl`` seconds. A token whose
  ``kid`` is not known makes the verifier fetch again (key rotation), at most once per
  ``refetch_interval`` seconds however many such tokens arrive, and concurrent callers share one
  fetch. When the JWKS host is down, the keys fetched before keep being used (stale, for as
  long as it stays down) rather than failing every request; a URL that has never answered
  fails only the tokens it would have verified, and is retried at most once per
  ``refetch_interval``. When the TTL has passed, the cached keys keep answering while the
  refresh runs in the background, so no request waits on the identity provider while keys
  are known (a withdrawn key is accepted until that refresh lands, milliseconds later).
* ``budgetd.jwt_public_key``: a PEM public key (or certificate). It has no ``kid``, so it is
  tried for any token its type fits.
* ``budgetd.jwt_hmac_secret``: a shared secret, the only key HS256/HS384/HS512 tokens are ever
  checked with, and it is never used for any other algorithm (no HS/RS confusion).

Algorithms come from an allow-list (``JwtSettings.algorithms``); ``none`` is never accepted.
A JWKS key's own ``alg``, when it has one, must be the token's, and the key type (RSA, the
EC curve, Ed25519/Ed448) must fit the algorithm. JWKS keys of type ``oct`` (shared secrets)
are ignored: an HMAC key published in a JWKS would let anyone who reads it sign tokens.

Time claims are checked against the injected :class:`~server.clock.Clock` with
``JwtSettings.leeway`` seconds of slack, not by PyJWT (which reads the wall clock). A token
without ``exp`` is accepted, as LiteLLM does: the identity provider decides whether tokens
expire. ``aud`` and ``iss`` are checked only when an audience / issuer is configured.

Every problem with a token is a :class:`JwtInvalid` whose message says what is wrong.

The algorithm names, :class:`JwtIdentity` and :class:`JwtInvalid` live in
:mod:`server.jwt_types` (re-exported here), so that the config checks and the principals
need not import this module: PyJWT, cryptography and aiohttp are loaded only when JWT
authentication is configured. Loading keys (PEM and JWKS entries) and matching them to
algorithms is :mod:`server.jwt_keys`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import aiohttp
import jwt
from jwt.types import Options

from server.clock import Clock
from server.jwt_keys import (
    JwtKey,
    PublicKey,
    describe_key,
    key_fits,
    load_public_key_pem,
    parse_jwks,
)
from server.jwt_types import (
    ASYMMETRIC_ALGORITHMS,
    DEFAULT_ALGORITHMS,
    HMAC_ALGORITHMS,
    HMAC_KEY_BYTES,
    HMAC_MIN_SECRET_BYTES,
    SUPPORTED_ALGORITHMS,
    JwtIdentity,
    JwtInvalid,
)

if TYPE_CHECKING:
    from server.settings import JwtSettings

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "HMAC_KEY_BYTES",
    "HMAC_MIN_SECRET_BYTES",
    "SUPPORTED_ALGORITHMS",
    "JwtIdentity",
    "JwtInvalid",
    "JwtVerifier",
    "PublicKey",
    "describe_key",
    "key_fits",
    "load_public_key_pem",
]

log = logging.getLogger("budgetd.jwt")

# Bounds on what an untrusted token or JWKS response may make us parse.
MAX_TOKEN_CHARS: Final = 32 * 1024
MAX_JWKS_BYTES: Final = 1024 * 1024
DEFAULT_REFETCH_INTERVAL: Final = 5.0
DEFAULT_FETCH_TIMEOUT: Final = 5.0
PEM_SOURCE: Final = "budgetd.jwt_public_key"


# --------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------


def _claim(claims: Mapping[str, Any], path: str) -> object:
    """A claim by name, or by dotted path (``realm.team``) when no claim has that exact name.

    The exact name wins because namespaced claims (``https://example.com/team``) contain dots.
    """
    if path in claims:
        return claims[path]
    value: object = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _claim_text(value: object, name: str) -> str:
    """A claim value as an id: strings as they are, integers in decimal, nothing else."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = "a boolean" if isinstance(value, bool) else f"a {type(value).__name__}"
    raise JwtInvalid(f"JWT claim {name!r} must be a string or an integer (got {kind})")


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(float(value))
    ):
        raise JwtInvalid(f"JWT claim {name!r} must be a number of seconds since the epoch")
    return float(value)


# --------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Jwks:
    """One JWKS URL's keys, and how fresh they are."""

    url: str
    keys: tuple[JwtKey, ...] = ()
    fetched_at: float | None = None  # None: never fetched successfully
    error: str | None = None  # why the last fetch failed (None: it did not)


@dataclass(frozen=True, slots=True)
class _Selection:
    keys: tuple[JwtKey, ...]  # the keys to try, all fitting the algorithm
    exact: bool  # whether they were found by the token's kid
    problem: str  # what to say when there is nothing to try


class _FetchError(Exception):
    """A JWKS URL answered, but not with a JWKS."""


class JwtVerifier:
    """Verifies JWTs against the configured keys; one per process, shared by all requests.

    ``fetch`` replaces the HTTP GET of a JWKS URL (it returns the decoded JSON); without it
    the verifier owns an aiohttp session, opened by :meth:`start` (or the first fetch) and
    closed by :meth:`close`. ``refetch_interval`` is the least time between two JWKS fetches
    started by unknown ``kid``s, expired caches or failures.
    """

    def __init__(
        self,
        settings: JwtSettings,
        *,
        clock: Clock,
        fetch: Callable[[str], Awaitable[object]] | None = None,
        refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._fetch = fetch
        self._refetch_interval = refetch_interval
        self._fetch_timeout = fetch_timeout
        # "none" and unknown names are dropped even if a hand-built JwtSettings lists them.
        self._algorithms = frozenset(a for a in settings.algorithms if a in SUPPORTED_ALGORITHMS)
        urls = [url.strip() for url in (settings.public_key_url or "").split(",")]
        self._jwks = tuple(_Jwks(url) for url in dict.fromkeys(url for url in urls if url))
        self._pem: JwtKey | None = None
        if settings.public_key_pem is not None:
            try:
                pem_key = load_public_key_pem(settings.public_key_pem)
            except ValueError as exc:
                raise ValueError(f"{PEM_SOURCE} {exc}") from None
            self._pem = JwtKey(kid=None, alg=None, key=pem_key, source=PEM_SOURCE)
        self._secret = settings.hmac_secret.encode() if settings.hmac_secret else None
        # Claim checks are ours (our clock, our messages); PyJWT checks the signature, with
        # keys below the recommended size refused rather than merely warned about.
        options: Options = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": False,
            "verify_iss": False,
            "verify_sub": False,
            "verify_jti": False,
            "enforce_minimum_key_length": True,
        }
        self._jwt = jwt.PyJWT(options)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._last_attempt: float | None = None
        self._refreshing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JwtVerifier:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the HTTP session for JWKS URLs (nothing is fetched until a token needs keys)."""
        if self._fetch is None and self._jwks and self._session is None and not self._closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._fetch_timeout)
            )

    async def close(self) -> None:
        """Stop any fetch in flight and close the HTTP session."""
        self._closed = True
        task, self._refreshing = self._refreshing, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def refresh(self) -> None:
        """Fetch every JWKS URL now (joining a fetch in flight); failures keep cached keys."""
        task = self._refreshing or self._start_refresh()
        # Shielded: a caller that gives up must not cancel the fetch the others wait for.
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # this caller is being cancelled
            # The fetch was stopped by close(); its callers carry on with the keys they have.

    async def verify(self, token: str) -> JwtIdentity:
        """Verify ``token`` (the bearer credential, without ``Bearer``) and read its identity.

        Raises :class:`JwtInvalid`, naming the problem, for every token that cannot be
        accepted: malformed, an algorithm off the allow-list, a bad signature, no key for its
        ``kid``, expired or not yet valid, the wrong audience or issuer, a bad identity claim.
        """
        header = self._header(token)
        token = token.strip()
        alg, kid = header["alg"], header.get("kid")
        if alg in HMAC_ALGORITHMS:
            claims = self._verify_hmac(token, alg)
        else:
            claims = await self._verify_public(token, alg, kid)
        self._check_claims(claims)
        return self._identity(claims)

    # -- the header ----------------------------------------------------------------------------

    def _header(self, token: object) -> dict[str, Any]:
        if not isinstance(token, str):
            raise JwtInvalid("JWT is malformed (not a string)")
        token = token.strip()
        if not token:
            raise JwtInvalid("JWT is malformed (empty)")
        if len(token) > MAX_TOKEN_CHARS:
            raise JwtInvalid(f"JWT is malformed (longer than {MAX_TOKEN_CHARS} characters)")
        segments = token.count(".") + 1
        if segments != 3:
            raise JwtInvalid(
                f"JWT is malformed (expected 3 dot-separated segments, got {segments})"
            )
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise JwtInvalid(f"JWT is malformed ({exc})") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise JwtInvalid("JWT is malformed (its header names no alg)")
        if alg.lower() == "none":
            raise JwtInvalid(f"JWT algorithm {alg!r} is not allowed: a JWT must be signed")
        if alg not in self._algorithms:
            allowed = ", ".join(a for a in SUPPORTED_ALGORITHMS if a in self._algorithms)
            raise JwtInvalid(f"JWT algorithm {alg!r} is not allowed (allowed: {allowed})")
        return header

    # -- signatures ----------------------------------------------------------------------------

    def _verify_hmac(self, token: str, alg: str) -> dict[str, Any]:
        # HS tokens are checked with the configured secret and nothing else: never with a
        # public key, whose PEM text an attacker knows (the HS/RS confusion attack).
        if self._secret is None:
            raise JwtInvalid(f"JWT algorithm {alg!r} needs budgetd.jwt_hmac_secret, which is unset")
        claims = self._decode(token, alg, self._secret)
        if claims is None:
            raise JwtInvalid("JWT signature is invalid")
        return claims

    async def _verify_public(self, token: str, alg: str, kid: str | None) -> dict[str, Any]:
        if not self._jwks and self._pem is None:
            raise JwtInvalid(
                "JWT cannot be verified: no key source is configured (set JWT_PUBLIC_KEY_URL, "
                "budgetd.jwt_public_key or budgetd.jwt_hmac_secret)"
            )
        if self._jwks:
            await self._freshen()
        selection = self._select(alg, kid)
        if selection.keys:
            claims = self._try(token, alg, selection.keys)
            if claims is not None:
                return claims
            if selection.exact:
                # The kid is known: its key did not sign this. Fetching again would let
                # anyone with a forged signature make us hammer the JWKS host.
                raise JwtInvalid("JWT signature is invalid")
        # An unknown kid, or no key that verifies: the issuer may have rotated its keys.
        if self._jwks and self._may_fetch():
            await self.refresh()
            selection = self._select(alg, kid)
            claims = self._try(token, alg, selection.keys) if selection.keys else None
            if claims is not None:
                return claims
        if selection.keys:
            raise JwtInvalid("JWT signature is invalid")
        raise JwtInvalid(selection.problem)

    def _try(self, token: str, alg: str, keys: Sequence[JwtKey]) -> dict[str, Any] | None:
        """The claims if one of ``keys`` verifies the signature, else None."""
        for key in keys:
            claims = self._decode(token, alg, key.key)
            if claims is not None:
                return claims
        return None

    def _decode(self, token: str, alg: str, key: PublicKey | bytes) -> dict[str, Any] | None:
        """The claims if ``key`` verifies the token's signature, None if it does not."""
        try:
            # algorithms=[alg]: alg is the token's, but it was checked against our allow-list
            # and ``key`` was chosen to fit it, so the token cannot pick how it is verified.
            return self._jwt.decode(token, key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            return None
        except jwt.InvalidKeyError as exc:
            # A key too weak for the algorithm (a short HMAC secret): it cannot vouch.
            log.warning("JWT key refused for %s: %s", alg, exc)
            return None
        except jwt.DecodeError as exc:
            raise JwtInvalid(f"JWT is malformed ({exc})") from None
        except jwt.PyJWTError as exc:
            raise JwtInvalid(f"JWT is invalid ({exc})") from None

    # -- keys ----------------------------------------------------------------------------------

    def _select(self, alg: str, kid: str | None) -> _Selection:
        """The keys that may have signed a token with this ``alg`` and ``kid``."""
        known = [key for jwks in self._jwks for key in jwks.keys]
        if self._pem is not None:
            known.append(self._pem)
        matched = [key for key in known if kid is not None and key.kid == kid]
        exact = bool(matched)
        if not exact:
            # Without a kid match, the keys that have no kid (the PEM, kid-less JWKS keys)
            # may have signed it; a token without a kid may be any key's.
            matched = [key for key in known if kid is None or key.kid is None]
        fitting = tuple(key for key in matched if key.alg in (None, alg) and key_fits(alg, key.key))
        return _Selection(fitting, exact, self._problem(alg, kid, matched, exact))

    def _problem(self, alg: str, kid: str | None, matched: list[JwtKey], exact: bool) -> str:
        """Why no key can verify the token (only used when ``fitting`` is empty)."""
        errors = "; ".join(jwks.error for jwks in self._jwks if jwks.error)
        if exact:
            key = matched[0]
            if key.alg not in (None, alg):
                return f"JWT key id {kid!r} is for {key.alg}, not {alg}"
            return f"JWT key id {kid!r} cannot verify {alg}: it is {describe_key(key.key)}"
        if not any(jwks.keys for jwks in self._jwks) and self._pem is None and errors:
            return errors  # nothing has ever been fetched: say why
        if kid is not None and not matched:
            where = "the JWKS" if self._jwks else PEM_SOURCE
            return f"JWT key id {kid!r} is not in {where}" + (f" ({errors})" if errors else "")
        return f"JWT cannot be verified: no configured key fits algorithm {alg!r}" + (
            f" ({errors})" if errors else ""
        )

    async def _freshen(self) -> None:
        """Make sure there are JWKS keys to try, and refresh them when their TTL has passed."""
        now = self._clock.now()
        if not any(jwks.fetched_at is not None for jwks in self._jwks):
            # Nothing cached: this token must wait for the first fetch (or share it).
            if self._may_fetch():
                await self.refresh()
            return
        ttl = self._settings.public_key_ttl
        stale = any(jwks.fetched_at is None or now - jwks.fetched_at >= ttl for jwks in self._jwks)
        if stale and self._refreshing is None and self._may_fetch():
            # Cached keys keep answering; the refresh runs in the background.
            self._start_refresh()

    def _may_fetch(self) -> bool:
        """Whether a fetch is in flight (join it) or the last one is long enough ago."""
        if self._closed:
            return False
        if self._refreshing is not None or self._last_attempt is None:
            return True
        return self._clock.now() - self._last_attempt >= self._refetch_interval

    def _start_refresh(self) -> asyncio.Task[None]:
        """Start fetching every JWKS URL; concurrent callers wait on this one task."""
        self._last_attempt = self._clock.now()
        task = asyncio.create_task(self._fetch_all(), name="budgetd-jwks-refresh")
        self._refreshing = task
        task.add_done_callback(self._refresh_done)
        return task

    def _refresh_done(self, task: asyncio.Task[None]) -> None:
        if self._refreshing is task:
            self._refreshing = None

    async def _fetch_all(self) -> None:
        await asyncio.gather(*(self._fetch_one(jwks) for jwks in self._jwks))

    async def _fetch_one(self, jwks: _Jwks) -> None:
        try:
            document = await (self._fetch or self._http_get)(jwks.url)
            keys = parse_jwks(document, jwks.url)
        except asyncio.CancelledError:
            jwks.error = f"JWKS at {jwks.url} could not be fetched: the verifier is closing"
            raise
        # Whatever goes wrong (network, HTTP status, JSON, a custom fetch's own errors), the
        # previous keys stay: a brief outage of the identity provider must not lock everyone out.
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self._fetch_timeout:g} s"
            jwks.error = f"JWKS at {jwks.url} could not be fetched: {reason}"
            if jwks.fetched_at is not None:
                log.warning(
                    "%s; still using the %d keys fetched before", jwks.error, len(jwks.keys)
                )
            else:
                log.warning("%s", jwks.error)
            return
        jwks.keys, jwks.fetched_at, jwks.error = keys, self._clock.now(), None
        log.debug("JWKS at %s: %d keys", jwks.url, len(keys))

    async def _http_get(self, url: str) -> object:
        if self._closed:
            raise _FetchError("the verifier is closed")
        await self.start()
        assert self._session is not None
        async with self._session.get(url, headers={"Accept": "application/json"}) as response:
            if response.status != 200:
                raise _FetchError(f"HTTP {response.status}")
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchError(f"the response is larger than {MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError("the response is not JSON") from None

    # -- claims --------------------------------------------------------------------------------

    def _check_claims(self, claims: Mapping[str, Any]) -> None:
        now, leeway = self._clock.now(), self._settings.leeway
        expires = _numeric_date(claims, "exp")
        if expires is not None and now - leeway >= expires:
            raise JwtInvalid("JWT has expired")
        not_before = _numeric_date(claims, "nbf")
        if not_before is not None and not_before > now + leeway:
            raise JwtInvalid("JWT is not valid yet (nbf is in the future)")
        issued = _numeric_date(claims, "iat")
        if issued is not None and issued > now + leeway:
            raise JwtInvalid("JWT is not valid yet (iat is in the future)")
        issuer = self._settings.issuer
        if issuer is not None:
            if "iss" not in claims:
                raise JwtInvalid(f"JWT has no iss claim; the issuer must be {issuer!r}")
            if claims["iss"] != issuer:
                raise JwtInvalid(f"JWT issuer is not {issuer!r}")
        audience = self._settings.audience
        if audience is not None:
            given = claims.get("aud")
            if given is None:
                raise JwtInvalid(f"JWT has no aud claim; the audience must be {audience!r}")
            audiences = [given] if isinstance(given, str) else given
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise JwtInvalid("JWT claim 'aud' must be a string or a list of strings")
            if audience not in audiences:
                raise JwtInvalid(f"JWT audience is not {audience!r}")

    def _identity(self, claims: dict[str, Any]) -> JwtIdentity:
        settings = self._settings
        team = ""
        if settings.team_id_jwt_field:
            field = settings.team_id_jwt_field
            team = _claim_text(_claim(claims, field), field)
        if not team and settings.team_ids_jwt_field:
            field = settings.team_ids_jwt_field
            teams = _claim(claims, field)
            if teams is not None and not isinstance(teams, list):
                raise JwtInvalid(f"JWT claim {field!r} must be a list of team ids")
            if teams:
                team = _claim_text(teams[0], f"{field}[0]")
        if not team and settings.team_id_default:
            team = settings.team_id_default
        user = ""
        if settings.user_id_jwt_field:
            field = settings.user_id_jwt_field
            user = _claim_text(_claim(claims, field), field)
        return JwtIdentity(team_id=team, user_id=user, claims=MappingProxyType(claims))
