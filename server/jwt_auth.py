"""JWT credentials: verify a bearer JWT (PyJWT) and read the team and user it names.

Where the keys come from (``JwtSettings``):

* ``JWT_PUBLIC_KEY_URL``: one or more comma-separated JWKS URLs whose keys are merged. How
  they are fetched, cached and fetched again (key rotation, an identity provider that is
  down, the TTL) is :mod:`server.jwt_jwks`.
* ``budgetd.jwt_public_key``: a PEM public key (or certificate). It has no ``kid``, so it is
  tried for any token its type fits.
* ``budgetd.jwt_hmac_secret``: a shared secret, the only key HS256/HS384/HS512 tokens are ever
  checked with, and it is never used for any other algorithm (no HS/RS confusion).

Algorithms come from an allow-list (``JwtSettings.algorithms``); ``none`` is never accepted.
A JWKS key's own ``alg``, when it has one, must be the token's, and the key type (RSA, the
EC curve, Ed25519/Ed448) must fit the algorithm. JWKS keys of type ``oct`` (shared secrets)
are ignored: an HMAC key published in a JWKS would let anyone who reads it sign tokens.

Once the signature is verified here, the time claims, ``aud`` and ``iss`` are checked, and
the team and user read, by :mod:`server.jwt_claims`.

Every problem with a token is a :class:`JwtInvalid` whose message says what is wrong.

The algorithm names, :class:`JwtIdentity` and :class:`JwtInvalid` live in
:mod:`server.jwt_types`, so that the config checks and the principals
need not import this module: PyJWT, cryptography and aiohttp are loaded only when JWT
authentication is configured. Loading keys (PEM and JWKS entries) and matching them to
algorithms is :mod:`server.jwt_keys`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import jwt
from jwt.types import Options

from server.clock import Clock
from server.jwt_claims import check_claims, read_identity
from server.jwt_jwks import DEFAULT_FETCH_TIMEOUT, DEFAULT_REFETCH_INTERVAL, JwksCache
from server.jwt_keys import JwtKey, PublicKey, describe_key, key_fits, load_public_key_pem
from server.jwt_types import HMAC_ALGORITHMS, SUPPORTED_ALGORITHMS, JwtIdentity, JwtInvalid

if TYPE_CHECKING:
    from server.settings import JwtSettings

__all__ = ["JwtVerifier"]

log = logging.getLogger("budgetd.jwt")

# The bound on what an untrusted token may make us parse.
MAX_TOKEN_CHARS: Final = 32 * 1024
PEM_SOURCE: Final = "budgetd.jwt_public_key"


@dataclass(frozen=True, slots=True)
class _Selection:
    keys: tuple[JwtKey, ...]  # the keys to try, all fitting the algorithm
    exact: bool  # whether they were found by the token's kid
    problem: str  # what to say when there is nothing to try


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
        # "none" and unknown names are dropped even if a hand-built JwtSettings lists them.
        self._algorithms = frozenset(a for a in settings.algorithms if a in SUPPORTED_ALGORITHMS)
        self._jwks = JwksCache(
            settings,
            clock=clock,
            fetch=fetch,
            refetch_interval=refetch_interval,
            fetch_timeout=fetch_timeout,
        )
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

    async def __aenter__(self) -> JwtVerifier:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the HTTP session for JWKS URLs (nothing is fetched until a token needs keys)."""
        await self._jwks.start()

    async def close(self) -> None:
        """Stop any fetch in flight and close the HTTP session."""
        await self._jwks.close()

    async def refresh(self) -> None:
        """Fetch every JWKS URL now (joining a fetch in flight); failures keep cached keys."""
        await self._jwks.refresh()

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
        check_claims(claims, self._settings, self._clock.now())
        return read_identity(claims, self._settings)

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
        if not self._jwks.sources and self._pem is None:
            raise JwtInvalid(
                "JWT cannot be verified: no key source is configured (set JWT_PUBLIC_KEY_URL, "
                "budgetd.jwt_public_key or budgetd.jwt_hmac_secret)"
            )
        if self._jwks.sources:
            await self._jwks.freshen()
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
        if self._jwks.sources and self._jwks.may_fetch():
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
        known = [key for jwks in self._jwks.sources for key in jwks.keys]
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
        errors = "; ".join(jwks.error for jwks in self._jwks.sources if jwks.error)
        if exact:
            key = matched[0]
            if key.alg not in (None, alg):
                return f"JWT key id {kid!r} is for {key.alg}, not {alg}"
            return f"JWT key id {kid!r} cannot verify {alg}: it is {describe_key(key.key)}"
        if not any(jwks.keys for jwks in self._jwks.sources) and self._pem is None and errors:
            return errors  # nothing has ever been fetched: say why
        if kid is not None and not matched:
            where = "the JWKS" if self._jwks.sources else PEM_SOURCE
            return f"JWT key id {kid!r} is not in {where}" + (f" ({errors})" if errors else "")
        return f"JWT cannot be verified: no configured key fits algorithm {alg!r}" + (
            f" ({errors})" if errors else ""
        )
