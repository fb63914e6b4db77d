"""Small conversions between Envoy's generated messages (xds-protos) and plain values."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2

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
