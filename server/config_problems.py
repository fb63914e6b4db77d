"""How budgetd words a config problem: a key's dotted path, and a pydantic error explained.

:func:`dotted` turns a location such as ``("model_list", 0, "model_name")`` into the KEY of
``WHERE: KEY: what is wrong``; :func:`explain` turns one of pydantic's validation errors of
the file's model (:mod:`server.config_model`) into that location and a message in budgetd's
words (with a "did you mean" hint for a misspelled key).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Final

from pydantic_core import ErrorDetails

from server.config_model import section_at
from server.config_values import describe

__all__ = ["dotted", "explain"]

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_TYPE_MESSAGES: Final[Mapping[str, str]] = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "float_type": "must be a number",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
}


def dotted(loc: tuple[object, ...]) -> str:
    """``("model_list", 0, "model_name")`` -> ``model_list[0].model_name``."""
    text = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY.match(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text or "(top level)"


def explain(error: ErrorDetails) -> tuple[tuple[object, ...], str]:
    """A pydantic error as (location, message in budgetd's words)."""
    loc: tuple[object, ...] = tuple(error["loc"])
    kind = error["type"]
    if "[key]" in loc:
        loc = loc[: loc.index("[key]")]
        prefix = "the key "
    else:
        prefix = ""
    if kind == "value_error":
        cause = (error.get("ctx") or {}).get("error")
        return loc, prefix + str(cause if cause is not None else error["msg"])
    if kind == "extra_forbidden":
        return loc, _unknown_key(loc)
    if kind == "missing":
        return loc, "is required"
    message = _TYPE_MESSAGES.get(kind, error["msg"])
    return loc, f"{prefix}{message} (got {describe(error.get('input'))})"


def _unknown_key(loc: tuple[object, ...]) -> str:
    section = section_at(loc[:-1])
    key = loc[-1] if loc else ""
    if not isinstance(key, str):
        return f"keys must be strings (got {describe(key)})"
    known = sorted(section.known_keys()) if section else []
    hint = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
