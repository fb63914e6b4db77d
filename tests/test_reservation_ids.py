"""Reservation ids (server/identity.py): they carry whose hold it is and when its request
was admitted, nobody without the instance secret can make or alter one, and the ids of the
earlier form (r2) handed out before an upgrade are still read."""

from __future__ import annotations

import base64
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.identity import ReservationCodec, ReservationRef

SECRET = b"k" * 32
NOW = 1_718_318_916.123


def r2_id(secret: bytes, fields: tuple[str, ...]) -> str:
    """An id as budgetd made them before r3: HMAC-SHA256 over one base64url payload."""
    payload = base64.urlsafe_b64encode("\x1f".join(fields).encode()).decode().rstrip("=")
    mac = hmac.digest(secret, payload.encode(), "sha256")[:12]
    return f"r2.{payload}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


# Ids come off the wire, whose strings are valid UTF-8 (no lone surrogates).
text = st.text(st.characters(blacklist_characters="\x1f", codec="utf-8"))


@given(team=text, key=text, user=text, tokens=st.integers(0, 10**9))
def test_what_is_encoded_is_decoded(team: str, key: str, user: str, tokens: int) -> None:
    codec = ReservationCodec(SECRET)
    made = codec.encode(team, key, NOW, user_id=user, estimated_tokens=tokens)
    ref = codec.decode(made)
    assert ref is not None
    assert (ref.team_id, ref.key_id, ref.user_id, ref.estimated_tokens) == (
        team,
        key,
        user,
        tokens,
    )
    assert ref.admitted_at_ms == int(NOW * 1000)
    # Another replica (same secret) reads it; another deployment (secret) does not.
    assert ReservationCodec(SECRET).decode(made) == ref
    assert ReservationCodec(b"x" * 32).decode(made) is None


def test_ids_never_repeat() -> None:
    codec = ReservationCodec(SECRET)
    made = {codec.encode("t", "k", NOW) for _ in range(10_000)}
    assert len(made) == 10_000
    assert ReservationCodec(SECRET).encode("t", "k", NOW) not in made


def test_every_altered_character_is_refused() -> None:
    codec = ReservationCodec(SECRET)
    made = codec.encode("team", "key", NOW, user_id="alice", estimated_tokens=7)
    for i, char in enumerate(made):
        for other in {"A", "0", ".", "-"} - {char}:
            assert codec.decode(made[:i] + other + made[i + 1 :]) is None, (i, other)


@pytest.mark.parametrize(
    "bad", ["", "r3", "r3.a.b.c.d.e", "r2.a.b", "r3..1.2.3.x", "x" * 40, "r9.a.1.n.0.m"]
)
def test_malformed_ids_are_refused(bad: str) -> None:
    assert ReservationCodec(SECRET).decode(bad) is None


def test_the_earlier_form_is_still_read() -> None:
    old = r2_id(SECRET, ("team", "key", "1718318916123", "ab12", "alice", "42"))
    assert ReservationCodec(SECRET).decode(old) == ReservationRef(
        "team", "key", 1_718_318_916_123, "ab12", "alice", 42
    )
    assert ReservationCodec(b"x" * 32).decode(old) is None
    assert ReservationCodec(SECRET).decode(old[:-1] + ("A" if old[-1] != "A" else "B")) is None
