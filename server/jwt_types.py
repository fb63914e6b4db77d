"""What the rest of budgetd knows about JWTs without loading PyJWT, cryptography or aiohttp.

The algorithm names (for the config checks), :class:`JwtIdentity` and :class:`JwtInvalid`.
The verifier itself, and everything that parses keys, is :mod:`server.jwt_auth`, which is
imported only when JWT authentication is configured (it costs a large part of a cold start).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "EC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "HMAC_KEY_BYTES",
    "HMAC_MIN_SECRET_BYTES",
    "RSA_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "JwtIdentity",
    "JwtInvalid",
]

RSA_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
# The ECDSA algorithms; server.jwt_keys.EC_CURVES gives each one's curve (same names, same order).
EC_ALGORITHMS: Final = ("ES256", "ES256K", "ES384", "ES512")
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
HMAC_KEY_BYTES: Final[Mapping[str, int]] = MappingProxyType({"HS256": 32, "HS384": 48, "HS512": 64})
HMAC_ALGORITHMS: Final = tuple(HMAC_KEY_BYTES)
HMAC_MIN_SECRET_BYTES: Final = min(HMAC_KEY_BYTES.values())
ASYMMETRIC_ALGORITHMS: Final = (*RSA_ALGORITHMS, *EC_ALGORITHMS, "EdDSA")
SUPPORTED_ALGORITHMS: Final = (*ASYMMETRIC_ALGORITHMS, *HMAC_ALGORITHMS)
# The allow-list when none is configured: every asymmetric algorithm in common use.
DEFAULT_ALGORITHMS: Final = (*RSA_ALGORITHMS, "ES256", "ES384", "ES512", "EdDSA")


class JwtInvalid(Exception):
    """The token cannot be accepted; the message says why (it is shown to the caller)."""


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """Who a verified token speaks for."""

    team_id: str  # "" when the token names no team (and there is no team_id_default)
    user_id: str  # "" when the token names no user
    claims: Mapping[str, Any]  # every claim of the verified token, read-only
