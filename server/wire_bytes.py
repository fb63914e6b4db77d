"""Hot answers on the wire as their template's bytes followed by the few fields of their own.

A hot-path allow (:mod:`server.hot`) differs from its template only in its reservation id
and its estimate. Protobuf's parser merges what it reads into what it has read: a later
scalar replaces an earlier one, repeated fields and map entries are appended (a later entry
of a map key wins), an embedded message is merged field by field. So the template's
serialised answer without those fields, followed by those fields alone, parses to the very
message a faces' full path builds, and an answer costs a byte join instead of a message
copy, two setters and a serialisation of the whole (the two faces keep one such base per
template, see ``WireDecisions`` and ``AllowAnswers``).

The encoders below write the protobuf wire format for the few shapes those suffixes need
(length-delimited fields and doubles); the tests parse what they write with protobuf.
:func:`serialized` is the response serialiser of a method whose handler may return such
bytes (:func:`server.registration.add_service` installs it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, TypeVar

_LENGTH_DELIMITED = 2
_FIXED64 = 1
_DOUBLE = struct.Struct("<d").pack
V = TypeVar("V")


def varint(value: int) -> bytes:
    """``value`` (not negative) as a protobuf varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# The varint of every length a hot answer's fields have (a few hundred bytes): looked up,
# not computed, since on a loaded event loop each Python call costs a microsecond or so.
_SHORT = 2048
_LENGTHS = tuple(varint(n) for n in range(_SHORT))


def length_delimited(key: bytes, payload: bytes) -> bytes:
    """A string, bytes or embedded-message field: its ``key`` (:attr:`Field.key`), the
    payload's length, the payload."""
    size = len(payload)
    return key + (_LENGTHS[size] if size < _SHORT else varint(size)) + payload


def tag(number: int, wire_type: int) -> bytes:
    """The key that starts field ``number`` of ``wire_type``."""
    return varint(number << 3 | wire_type)


class Field:
    """One field of a message, its keys encoded once, for answers built per request."""

    def __init__(self, number: int) -> None:
        self.key = tag(number, _LENGTH_DELIMITED)  # as a string, bytes or message field
        self._fixed64 = tag(number, _FIXED64)

    @classmethod
    def of(cls, message: Any, name: str) -> Field:
        """Field ``name`` of the generated ``message`` class (its number from the descriptor)."""
        return cls(message.DESCRIPTOR.fields_by_name[name].number)

    def length_delimited(self, payload: bytes) -> bytes:
        """The field holding ``payload``: a string, bytes or an embedded message."""
        return length_delimited(self.key, payload)

    def double(self, value: float) -> bytes:
        """The field holding the double ``value``."""
        return self._fixed64 + _DOUBLE(value)


class HoldFields(dict[int, V]):
    """A face's serialised fields per hold amount in nano-USD (a hot key's estimate rarely
    changes, so they are built once). Reading is the dict's own ``get``; :meth:`keep`
    stores, starting over past ``capacity`` amounts."""

    def __init__(self, capacity: int = 1024) -> None:
        super().__init__()
        self._capacity = capacity

    def keep(self, nanos: int, fields: V) -> V:
        """Remember ``fields`` for holds of ``nanos``; returns them."""
        if len(self) >= self._capacity:
            self.clear()
        self[nanos] = fields
        return fields


def serialized(response: Any) -> bytes:
    """gRPC's response serialiser for a method whose handler may answer with bytes."""
    if response.__class__ is bytes:
        return response
    serialize: Callable[[], bytes] = response.SerializeToString
    return serialize()
