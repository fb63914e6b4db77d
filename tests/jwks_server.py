"""JWT test kit: signing keys, tokens, and a JWKS server (aiohttp, in process).

``SigningKey.rsa("k1")`` / ``.ec("k2")`` / ``.ed25519("k3")`` make a key pair with a ``kid``;
``key.sign(claims)`` makes a token (header ``kid`` and the key's algorithm unless told
otherwise), ``key.public_jwk()`` / ``key.public_pem()`` give what a verifier is configured with.

``JwksServer`` serves ``{"keys": [...]}`` on 127.0.0.1 at a free port::

    async with JwksServer([key]) as jwks:
        settings = JwtSettings(public_key_url=jwks.url)
        jwks.set_keys([key, new_key])   # rotation
        jwks.fail = True                # answer 500
        jwks.hang = True                # accept the request, never answer (until cleared)
        await jwks.stop(); await jwks.start()   # down, then up again on the same port
        jwks.requests                   # JWKS requests received so far
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

HOST = "127.0.0.1"
JWKS_PATH = "/.well-known/jwks.json"
# The largest time a hung request is held before it is answered anyway.
HANG_LIMIT_SECONDS = 60.0

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs test tokens, with the ``kid`` and algorithm it signs with."""

    kid: str
    alg: str
    private_key: PrivateKey

    @classmethod
    def rsa(cls, kid: str = "rsa-1", alg: str = "RS256", bits: int = 2048) -> SigningKey:
        """An RSA key (``alg`` may be any RS* or PS*)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return cls(kid, alg, key)

    @classmethod
    def ec(cls, kid: str = "ec-1") -> SigningKey:
        """An EC P-256 key (ES256)."""
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def ed25519(cls, kid: str = "ed-1") -> SigningKey:
        """An Ed25519 key (EdDSA)."""
        return cls(kid, "EdDSA", ed25519.Ed25519PrivateKey.generate())

    def sign(
        self,
        claims: Mapping[str, Any],
        alg: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A token over ``claims``; ``headers`` add to or replace ``kid`` (None drops it)."""
        header = {"kid": self.kid, **(headers or {})}
        return jwt.encode(
            dict(claims),
            self.private_key,
            algorithm=alg or self.alg,
            headers={name: value for name, value in header.items() if value is not None},
        )

    def public_jwk(self, *, with_alg: bool = True, **extra: Any) -> dict[str, Any]:
        """The public key as a JWK with ``kid``, ``use: sig`` and (unless told not) ``alg``."""
        public = self.private_key.public_key()
        jwk: dict[str, Any]
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, use="sig")
        if with_alg:
            jwk["alg"] = self.alg
        jwk.update(extra)
        return jwk

    def public_pem(self) -> str:
        """The public key as PEM (``-----BEGIN PUBLIC KEY-----``)."""
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


def token_claims(ttl: float = 300.0, now: float | None = None, **extra: Any) -> dict[str, Any]:
    """Typical claims: ``iat`` now, ``exp`` ``ttl`` seconds later, plus ``extra``."""
    issued = int(time.time() if now is None else now)
    return {"iat": issued, "exp": issued + int(ttl), **extra}


def hmac_token(
    secret: str | bytes,
    claims: Mapping[str, Any],
    alg: str = "HS256",
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A token signed with an HMAC secret (any bytes, even a PEM: PyJWT is bypassed).

    PyJWT refuses to sign with a PEM as HMAC secret, which is exactly the forgery (HS256
    signed with the RSA public key's PEM) a verifier must reject, so it is built by hand.
    """
    hashes = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    key = secret.encode() if isinstance(secret, str) else secret
    signing_input = _signing_input({"alg": alg, "typ": "JWT", **(headers or {})}, claims)
    signature = hmac.new(key, signing_input.encode(), hashes[alg]).digest()
    return f"{signing_input}.{_b64(signature)}"


def unsigned_token(claims: Mapping[str, Any], headers: Mapping[str, Any] | None = None) -> str:
    """An ``alg: none`` token (no signature)."""
    return _signing_input({"alg": "none", "typ": "JWT", **(headers or {})}, claims) + "."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header: Mapping[str, Any], claims: Mapping[str, Any]) -> str:
    def part(value: Mapping[str, Any]) -> str:
        return _b64(json.dumps(dict(value), separators=(",", ":")).encode())

    return f"{part(header)}.{part(claims)}"


class JwksServer:
    """A JWKS endpoint whose keys, failures and request count the test controls."""

    def __init__(
        self, keys: Iterable[SigningKey | Mapping[str, Any]] = (), *, port: int = 0
    ) -> None:
        self.port = port
        self.requests = 0
        self.fail = False  # answer HTTP 500
        self.document: Any = {}
        self.set_keys(keys)
        self._hang = False
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The JWKS URL (for ``JWT_PUBLIC_KEY_URL``)."""
        return f"http://{HOST}:{self.port}{JWKS_PATH}"

    @property
    def hang(self) -> bool:
        """Whether requests are held without an answer (until set back to False)."""
        return self._hang

    @hang.setter
    def hang(self, value: bool) -> None:
        self._hang = value
        if value:
            self._release.clear()
        else:
            self._release.set()

    def set_keys(self, keys: Iterable[SigningKey | Mapping[str, Any]]) -> None:
        """Serve these keys from now on (SigningKeys as their public JWK)."""
        self.document = {
            "keys": [key.public_jwk() if isinstance(key, SigningKey) else dict(key) for key in keys]
        }

    async def start(self) -> JwksServer:
        """Listen on 127.0.0.1 (a free port the first time, the same port after a stop)."""
        app = web.Application()
        app.router.add_get(JWKS_PATH, self._jwks)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening (connections are refused until :meth:`start`)."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._hang:
            self._release.clear()

    async def __aenter__(self) -> JwksServer:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self._hang:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), HANG_LIMIT_SECONDS)
        if self.fail:
            return web.json_response({"error": "JWKS unavailable"}, status=500)
        return web.json_response(self.document)
