"""server.wire_bytes: hand-encoded protobuf fields parse, with protobuf, to what they say,
and a template's bytes followed by them parse to the template with those fields set."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from hypothesis import given
from hypothesis import strategies as st

from server.envoy.wire import SetHeaderBytes, StructEntryBytes, set_headers
from server.gen.budgetd.v1 import budgetd_pb2 as pb
from server.wire_bytes import Field, serialized, varint

RESERVATION_ID = Field.of(pb.CheckBudgetResponse, "reservation_id")
RESERVED = Field.of(pb.CheckBudgetResponse, "reserved")
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
AMOUNT = st.floats(allow_nan=False)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_varint_is_protobufs(value: int) -> None:
    # A uint64 field's bytes are its tag (one byte here) and the varint.
    message = pb.CheckBudgetResponse(ratelimit_limit=0)
    message.ratelimit_limit = value if value < 2**63 else value - 2**64
    assert message.SerializeToString()[2:] == varint(value)


@given(reservation_id=TEXT, reserved=AMOUNT)
def test_fields_after_a_template_set_those_fields(reservation_id: str, reserved: float) -> None:
    template = pb.CheckBudgetResponse(
        allowed=True, team_id="t", spend=0.5, reservation_id="old", reserved=9.0, model="m"
    )
    base = template.SerializeToString()
    sent = (
        base + RESERVATION_ID.length_delimited(reservation_id.encode()) + RESERVED.double(reserved)
    )
    expected = pb.CheckBudgetResponse()
    expected.CopyFrom(template)
    expected.reservation_id = reservation_id
    expected.reserved = reserved
    assert pb.CheckBudgetResponse.FromString(sent) == expected


@given(name=st.sampled_from(["x-budget-reservation-id", "x-a"]), value=TEXT)
def test_header_bytes_are_set_headers(name: str, value: str) -> None:
    (option,) = set_headers({name: value})
    clean = option.header.value  # set_headers strips control characters
    assert base_pb2.HeaderValueOption.FromString(SetHeaderBytes(name)(clean.encode())) == option


@given(text=TEXT, number=AMOUNT)
def test_struct_entries_set_their_key(text: str, number: float) -> None:
    struct = struct_pb2.Struct()
    struct.update({"kept": "yes", "text": "old", "number": 1.0})
    sent = (
        struct.SerializeToString()
        + StructEntryBytes("text").string(text.encode())
        + StructEntryBytes("number").number(number)
    )
    parsed = struct_pb2.Struct.FromString(sent)
    assert dict(parsed) == {"kept": "yes", "text": text, "number": number}


def test_serialized_sends_bytes_as_they_are() -> None:
    assert serialized(b"\x08\x01") == b"\x08\x01"
    assert serialized(pb.CheckBudgetResponse(allowed=True)) == b"\x08\x01"
