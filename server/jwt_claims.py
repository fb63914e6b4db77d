"""JWT claims: check a verified token's time, issuer and audience claims, and read who it names.

Time claims are checked against the injected :class:`~server.clock.Clock` with
``JwtSettings.leeway`` seconds of slack, not by PyJWT (which reads the wall clock). A token
without ``exp`` is accepted, as LiteLLM does: the identity provider decides whether tokens
expire. ``aud`` and ``iss`` are checked only when an audience / issuer is configured.

The team and user are read from the claims ``JwtSettings`` names (by name, or by dotted path).
:class:`server.jwt_auth.JwtVerifier` calls these once a token's signature is verified; they
are apart from it because they need neither PyJWT nor the keys, only the decoded claims.
Every problem is a :class:`JwtInvalid` whose message says what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from server.jwt_types import JwtIdentity, JwtInvalid

if TYPE_CHECKING:
    from server.settings import JwtSettings

__all__ = ["check_claims", "read_identity"]


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


def check_claims(claims: Mapping[str, Any], settings: JwtSettings, now: float) -> None:
    """Raise :class:`JwtInvalid` unless ``exp``/``nbf``/``iat``, ``iss`` and ``aud`` are fine."""
    leeway = settings.leeway
    expires = _numeric_date(claims, "exp")
    if expires is not None and now - leeway >= expires:
        raise JwtInvalid("JWT has expired")
    not_before = _numeric_date(claims, "nbf")
    if not_before is not None and not_before > now + leeway:
        raise JwtInvalid("JWT is not valid yet (nbf is in the future)")
    issued = _numeric_date(claims, "iat")
    if issued is not None and issued > now + leeway:
        raise JwtInvalid("JWT is not valid yet (iat is in the future)")
    issuer = settings.issuer
    if issuer is not None:
        if "iss" not in claims:
            raise JwtInvalid(f"JWT has no iss claim; the issuer must be {issuer!r}")
        if claims["iss"] != issuer:
            raise JwtInvalid(f"JWT issuer is not {issuer!r}")
    audience = settings.audience
    if audience is not None:
        given = claims.get("aud")
        if given is None:
            raise JwtInvalid(f"JWT has no aud claim; the audience must be {audience!r}")
        audiences = [given] if isinstance(given, str) else given
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise JwtInvalid("JWT claim 'aud' must be a string or a list of strings")
        if audience not in audiences:
            raise JwtInvalid(f"JWT audience is not {audience!r}")


def read_identity(claims: dict[str, Any], settings: JwtSettings) -> JwtIdentity:
    """The team and user the claims name (as ``settings`` says where to find them)."""
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
