"""Credentials: API keys (stored only as SHA-256), the master key, reservation ids."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import os
import secrets
from dataclasses import dataclass

KEY_PREFIX = "sk-"
# 24 random bytes -> 32 url-safe characters after "sk-" (the design asks for >= 22).
_KEY_BYTES = 24
_RESERVATION_VERSION = "r3"
_V2 = "r2"  # the earlier form, still decoded
_MAC_BYTES = 12
_URLSAFE = bytes.maketrans(b"+/", b"-_")
_WHO_CACHE = 4096  # encoded (team, key, user) parts remembered by a codec


def generate_api_key() -> str:
    """A new plaintext API key: ``sk-`` followed by 32 url-safe random characters."""
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)


def hash_api_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


def key_display_prefix(key: str) -> str:
    """A non-secret prefix for recognising a key in listings (``sk-abcd…``)."""
    return key[: len(KEY_PREFIX) + 4] + "…"


def new_id(prefix: str) -> str:
    """A random identifier such as ``key_3f9c…`` (not secret)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def master_key_matches(presented: str | None, master_key: str) -> bool:
    """Constant-time comparison of a presented bearer token with the master key."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode(), master_key.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token in an ``authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass(frozen=True, slots=True)
class ReservationRef:
    """What a reservation id carries: whose hold it is and when its request was admitted.

    ``key_id`` is "" for a request authenticated by a JWT; ``user_id`` names the team member
    charged ("" = none); ``estimated_tokens`` is what the check charged to tpm limits, so
    RecordSpend can correct them by the actual tokens.
    """

    team_id: str
    key_id: str
    admitted_at_ms: int
    nonce: str
    user_id: str = ""
    estimated_tokens: int = 0

    @property
    def admitted_at(self) -> float:
        return self.admitted_at_ms / 1000.0


class ReservationCodec:
    """Encodes reservation ids that name their team, key, member and admission instant.

    A reservation id outlives its hold: when RecordSpend arrives after the hold expired, the
    spend is still charged to the windows of the instant the request was admitted. The MAC
    (keyed by the instance secret shared through the database) stops a caller from
    fabricating a reservation id to charge someone else's key.

    The current form (``r3``) is ``r3.<who>.<admitted ms>.<nonce>.<tokens>.<mac>``: ``who``
    is base64url of team, key and user (the same for every request of a key, so it is
    encoded once and remembered) and the MAC is keyed BLAKE2b over everything before it. Ids
    of the earlier form ``r2`` (HMAC-SHA256 over one base64 payload) are still read, so ids
    handed out before an upgrade settle after it.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        # Nonces: a random prefix per codec (per process) and a counter, so ids never repeat
        # without a system call for randomness on every decision.
        self._nonce_prefix = os.urandom(6).hex()
        self._serial = itertools.count()
        self._who: dict[tuple[str, str, str], str] = {}  # bounded: see _who_part
        # The MAC's keyed state, copied for each id: cheaper than keying BLAKE2b every time.
        self._mac_base = hashlib.blake2b(key=secret, digest_size=_MAC_BYTES)

    def encode(
        self,
        team_id: str,
        key_id: str,
        admitted_at: float,
        *,
        user_id: str = "",
        estimated_tokens: int = 0,
    ) -> str:
        """A new reservation id for a request admitted at ``admitted_at``."""
        prefix = self.prefix(team_id, key_id, user_id)
        return self.encode_after(prefix, admitted_at, estimated_tokens)

    def prefix(self, team_id: str, key_id: str, user_id: str = "") -> str:
        """What every reservation id of one (team, key, user) starts with, for
        :meth:`encode_after`: the hot path keeps it rather than look it up per request."""
        return f"{_RESERVATION_VERSION}.{self._who_part(team_id, key_id, user_id)}."

    def encode_after(self, prefix: str, admitted_at: float, estimated_tokens: int = 0) -> str:
        """The id :meth:`encode` gives, from a :meth:`prefix` of this codec."""
        body = (
            f"{prefix}{int(admitted_at * 1000)}.{self._nonce_prefix}{next(self._serial):x}"
            f".{estimated_tokens}"
        )
        # _mac and _b64, inlined: this runs for every hot-path allow.
        digest = self._mac_base.copy()
        digest.update(body.encode())
        mac = binascii.b2a_base64(digest.digest(), newline=False).translate(_URLSAFE)
        return f"{body}.{mac.rstrip(b'=').decode()}"

    def decode(self, reservation_id: str) -> ReservationRef | None:
        """The reference in a reservation id, or None when it is malformed or forged."""
        parts = reservation_id.split(".")
        if len(parts) == 3 and parts[0] == _V2:
            return self._decode_v2(parts[1], parts[2])
        if len(parts) != 6 or parts[0] != _RESERVATION_VERSION:
            return None
        body, mac = reservation_id.rpartition(".")[0], parts[5]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            team_id, key_id, user_id = _unb64(parts[1]).split("\x1f")
            admitted, tokens = int(parts[2]), int(parts[4])
        except ValueError:
            return None
        return ReservationRef(team_id, key_id, admitted, parts[3], user_id, tokens)

    def _who_part(self, team_id: str, key_id: str, user_id: str) -> str:
        who = (team_id, key_id, user_id)
        part = self._who.get(who)
        if part is None:
            part = _b64("\x1f".join(who).encode())
            if len(self._who) >= _WHO_CACHE:
                self._who.clear()  # many principals: start over rather than track age
            self._who[who] = part
        return part

    def _mac(self, body: str) -> str:
        digest = self._mac_base.copy()
        digest.update(body.encode())
        return _b64(digest.digest())

    def _decode_v2(self, payload: str, mac: str) -> ReservationRef | None:
        expected = hmac.digest(self._secret, payload.encode(), "sha256")[:_MAC_BYTES]
        if not hmac.compare_digest(mac, _b64(expected)):
            return None
        try:
            team_id, key_id, admitted, nonce, user_id, tokens = _unb64(payload).split("\x1f")
            return ReservationRef(team_id, key_id, int(admitted), nonce, user_id, int(tokens))
        except ValueError:
            return None


def _b64(data: bytes) -> str:
    """Unpadded base64url (what ``base64.urlsafe_b64encode`` gives, minus its Python layers)."""
    return binascii.b2a_base64(data, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> str:
    """The text base64url ``text`` encodes; ValueError when it is not that."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
