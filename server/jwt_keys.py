"""JWT verification keys: loading a PEM or a JWKS entry, and which algorithm each key fits.

Also used by the config checks (a configured PEM key is loaded and checked at start-up).
Only asymmetric keys are loaded here: a JWKS entry of type ``oct`` (a shared secret) is
refused, since an HMAC key published in a JWKS would let anyone who reads it sign tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from server.jwt_types import ASYMMETRIC_ALGORITHMS, RSA_ALGORITHMS

log = logging.getLogger("budgetd.jwt")

# The curve each ECDSA algorithm is defined on (RFC 7518 §3.4, RFC 8812 for ES256K); its keys
# are server.jwt_types.EC_ALGORITHMS.
EC_CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = MappingProxyType(
    {"ES256": ec.SECP256R1, "ES256K": ec.SECP256K1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
)

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
_PUBLIC_KEY_TYPES: Final = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
_PRIVATE_KEY_TYPES: Final = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
# PyJWT's own minimum (enforce_minimum_key_length); a weaker key is refused when loaded.
MIN_RSA_BITS: Final = 2048


def key_fits(algorithm: str, key: PublicKey) -> bool:
    """Whether ``key`` is of the type ``algorithm`` verifies with (RSA, the EC curve, EdDSA)."""
    if algorithm in RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    curve = EC_CURVES.get(algorithm)
    if curve is not None:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, curve)
    if algorithm == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def describe_key(key: PublicKey) -> str:
    """``an RSA key (2048 bits)``, ``an EC P-256 key``, ``an Ed25519 key``: for messages."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"an RSA key ({key.key_size} bits)"
    if isinstance(key, ec.EllipticCurvePublicKey):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"an EC {names.get(key.curve.name, key.curve.name)} key"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    return "an Ed448 key"


def _key_problem(key: object) -> str | None:
    """Why ``key`` cannot verify any supported algorithm, or None when it can."""
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        return f"is a {type(key).__name__}; JWTs are verified with RSA, EC or Ed25519/Ed448 keys"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return f"is a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are required"
    if not any(key_fits(algorithm, key) for algorithm in ASYMMETRIC_ALGORITHMS):
        return f"is {describe_key(key)}, which no JWT algorithm uses"
    return None


def load_public_key_pem(text: str) -> PublicKey:
    """Load a PEM public key (``-----BEGIN PUBLIC KEY-----``, PKCS#1 RSA) or certificate.

    A PEM whose newlines were written as the two characters ``\\n`` (common in environment
    variables) is accepted. Raises ``ValueError`` with a message that does not name the key.
    """
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    data = text.strip().encode("utf-8", "replace")
    if b"PRIVATE KEY-----" in data:
        raise ValueError(
            "is a private key; give the token issuer's public key (-----BEGIN PUBLIC KEY-----)"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(
            "is not a PEM public key (-----BEGIN PUBLIC KEY-----) or certificate"
        ) from None
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(problem)
    assert isinstance(key, _PUBLIC_KEY_TYPES)  # _key_problem checked it
    return key


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A verification key: from a JWKS (with its kid and alg, if given) or the PEM."""

    kid: str | None
    alg: str | None
    key: PublicKey
    source: str  # the JWKS URL, or PEM_SOURCE


def jwk_key(entry: object, source: str) -> JwtKey | str:
    """A JWKS entry as a key, or why it is skipped (a bad entry must not spoil the others)."""
    if not isinstance(entry, dict):
        return "is not a JSON object"
    kty, kid, alg = entry.get("kty"), entry.get("kid"), entry.get("alg")
    if kid is not None and not isinstance(kid, str):
        return "has a kid that is not a string"
    if kty == "oct":
        return "is a shared secret (kty oct); HS algorithms use only budgetd.jwt_hmac_secret"
    if entry.get("use") not in (None, "sig"):
        return f"is for use {entry.get('use')!r}, not signatures"
    ops = entry.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return "does not list verify in its key_ops"
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return f"is for algorithm {alg!r}, which budgetd does not verify with JWKS keys"
    # PyJWK infers ES256/RS256 from the key type when there is no alg; OKP keys (Ed25519 and
    # Ed448) are all EdDSA, which PyJWK only infers for Ed25519.
    hint = alg if alg is not None else ("EdDSA" if kty == "OKP" else None)
    try:
        loaded: object = jwt.PyJWK.from_dict(entry, algorithm=hint).key
    # The entry is untrusted JSON: whatever PyJWT or cryptography raise on it means "skip it".
    except Exception as exc:
        return f"cannot be loaded ({exc})"
    if isinstance(loaded, _PRIVATE_KEY_TYPES):
        loaded = loaded.public_key()  # a JWKS that leaks private parts still verifies
    problem = _key_problem(loaded)
    if problem is not None:
        return problem
    assert isinstance(loaded, _PUBLIC_KEY_TYPES)
    return JwtKey(kid=kid, alg=alg, key=loaded, source=source)


def parse_jwks(document: object, url: str) -> tuple[JwtKey, ...]:
    """The usable keys of a JWKS document; ``ValueError`` if it is not a JWKS at all."""
    entries: object
    if isinstance(document, dict) and "keys" in document:
        entries = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]  # a single JWK, which LiteLLM also accepts
    else:
        entries = document  # a bare list of JWKs (LiteLLM accepts it too)
    if not isinstance(entries, list):
        raise ValueError("the response is not a JWK Set (no 'keys' list)")
    keys: list[JwtKey] = []
    for index, entry in enumerate(entries):
        found = jwk_key(entry, url)
        if isinstance(found, str):
            name = entry.get("kid") if isinstance(entry, dict) else None
            log.warning("JWKS at %s: key %s %s; skipped", url, name or f"#{index}", found)
        else:
            keys.append(found)
    return tuple(keys)
