"""Small conversions between Envoy's generated messages (xds-protos) and plain values."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from server.wire_bytes import Field, length_delimited

# Header values must not carry control characters: a value from a request body (the model
# name) could otherwise try to split a header, and Envoy rejects such mutations outright.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_values(values: Iterable[Any]) -> dict[str, str]:
    """``{name: value}`` from Envoy ``HeaderValue``s (``value`` or, in newer Envoys, ``raw_value``).

    Names are lowercased; for a repeated header the first value is kept.
    """
    out: dict[str, str] = {}
    for item in values:
        value = item.value or item.raw_value.decode("utf-8", "replace")
        out.setdefault(item.key.lower(), value)
    return out


def header_text(value: str) -> str:
    """``value`` without control characters, safe to send as an HTTP header value."""
    return _CONTROL.sub("", value)


def set_headers(headers: dict[str, str]) -> list[Any]:
    """``HeaderValueOption``s that set (overwrite, never append) each header."""
    return [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=header_text(value)),
            append_action=_OVERWRITE,
        )
        for name, value in headers.items()
    ]


_OPTION_HEADER = Field.of(base_pb2.HeaderValueOption, "header")
_HEADER_KEY = Field.of(base_pb2.HeaderValue, "key")
_HEADER_VALUE = Field.of(base_pb2.HeaderValue, "value")
_ENTRY_KEY = Field.of(struct_pb2.Struct.FieldsEntry, "key")
_ENTRY_VALUE = Field.of(struct_pb2.Struct.FieldsEntry, "value")
_STRUCT_FIELDS = Field.of(struct_pb2.Struct, "fields")
_STRING_VALUE = Field.of(struct_pb2.Value, "string_value")
_NUMBER_VALUE = Field.of(struct_pb2.Value, "number_value")


class SetHeaderBytes:
    """The serialised ``HeaderValueOption`` that :func:`set_headers` builds for one header
    name, for each value (a value with nothing for ``header_text`` to strip)."""

    def __init__(self, name: str) -> None:
        self._key = _HEADER_KEY.length_delimited(name.encode())
        # Every field but the header, as set_headers sets them.
        self._rest: bytes = base_pb2.HeaderValueOption(append_action=_OVERWRITE).SerializeToString()

    def __call__(self, value: bytes) -> bytes:
        header = self._key + length_delimited(_HEADER_VALUE.key, value)
        return length_delimited(_OPTION_HEADER.key, header) + self._rest


class StructEntryBytes:
    """One entry of a ``google.protobuf.Struct``, serialised: parsed after a Struct's other
    bytes, it sets (or replaces) that one key."""

    def __init__(self, name: str) -> None:
        self._key = _ENTRY_KEY.length_delimited(name.encode())

    def string(self, value: bytes) -> bytes:
        """The entry holding the string ``value`` (UTF-8)."""
        value = length_delimited(_ENTRY_VALUE.key, length_delimited(_STRING_VALUE.key, value))
        return length_delimited(_STRUCT_FIELDS.key, self._key + value)

    def number(self, value: float) -> bytes:
        """The entry holding the number ``value``."""
        entry = self._key + length_delimited(_ENTRY_VALUE.key, _NUMBER_VALUE.double(value))
        return length_delimited(_STRUCT_FIELDS.key, entry)
