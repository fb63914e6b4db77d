"""OpenAI-style HTTP bodies: what a request asks for, and what its response used.

Pure functions and small incremental readers, no I/O. The gateway integrations (Envoy's
ext_authz on the request, ext_proc on the response) hand bodies in as bytes.

Requests (``POST /chat/completions``, ``/completions``, ``/embeddings``): ``model``,
``max_completion_tokens`` (else ``max_tokens``) and an estimate of the prompt's size. The
estimate is deliberately cheap, with no tokenizer: about one token per four characters of the
text the request sends (message contents, ``prompt``, ``input``), rounded up. It only sizes
the hold placed while the request runs; what is charged afterwards is the response's usage.

Responses: the ``usage`` block (``prompt_tokens``, ``completion_tokens``) of a JSON body, or
of the last Server-Sent Events chunk that carries one (OpenAI streams send it just before
``data: [DONE]`` when asked to with ``stream_options.include_usage``). Token counts that are
negative, not whole numbers or above 10^9 are treated as no usage, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from typing import Any

from server.validation import MAX_TEXT, MAX_TOKENS

log = logging.getLogger("budgetd.envoy")

CHARS_PER_TOKEN = 4
_JSON_TYPES = ("application/json", "+json")
_SSE_TYPE = "text/event-stream"
# Decompressed bytes produced per step: bounds memory whatever the compression ratio.
_INFLATE_STEP = 64 * 1024


class BodyError(Exception):
    """A request body budgetd refuses to guess about; ``status`` is the HTTP answer."""

    status = 400


class BodyTooLarge(BodyError):
    """Larger than ``max_body_bytes``: refused (413) rather than let through unread."""

    status = 413


class MalformedBody(BodyError):
    """Not JSON, or JSON whose model / token fields have the wrong type or range (400)."""

    status = 400


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What an OpenAI-style request asks for (empty when the body says nothing)."""

    model: str = ""
    max_tokens: int | None = None
    prompt_tokens: int | None = None
    stream: bool = False


# The facts of a request whose body says nothing (immutable, so one will do).
NO_FACTS = RequestFacts()


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a response reports it used, and the model it names (may be "")."""

    prompt_tokens: int
    completion_tokens: int
    model: str = ""


def is_json_type(content_type: str) -> bool:
    """True for ``application/json`` and ``*/*+json`` media types (parameters ignored)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media.endswith(_JSON_TYPES)


def parse_request(body: bytes, max_bytes: int, content_type: str = "") -> RequestFacts:
    """Model, max tokens and prompt-size estimate of a request body.

    An empty body, or one of a non-JSON content type (a multipart upload, say), gives empty
    facts: the request is checked on its key alone. Raises :class:`BodyTooLarge` above
    ``max_bytes`` and :class:`MalformedBody` for JSON that cannot be read as a request.
    """
    if len(body) > max_bytes:
        raise BodyTooLarge(f"request body is larger than {max_bytes} bytes ({len(body)})")
    if not body.strip() or (content_type and not is_json_type(content_type)):
        return NO_FACTS
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MalformedBody(f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise MalformedBody("request body must be a JSON object")
    model = data.get("model")
    if model is None:
        model = ""
    if not isinstance(model, str) or len(model) > MAX_TEXT or "\x00" in model:
        raise MalformedBody(f"model must be a string of at most {MAX_TEXT} characters")
    limit = data.get("max_completion_tokens")
    name = "max_completion_tokens"
    if limit is None:
        limit, name = data.get("max_tokens"), "max_tokens"
    if limit is not None and _token_count(limit) is None:
        raise MalformedBody(f"{name} must be a whole number from 0 to {MAX_TOKENS}")
    try:
        chars = sum(_text_chars(data.get(field)) for field in ("messages", "prompt", "input"))
    except RecursionError:
        raise MalformedBody("request body is nested too deeply") from None
    return RequestFacts(
        model=model,
        max_tokens=limit,
        prompt_tokens=math.ceil(chars / CHARS_PER_TOKEN) if chars else None,
        stream=data.get("stream") is True,
    )


def usage_from_json(body: bytes) -> Usage | None:
    """The usage of a complete JSON response body, or None when it has none."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return usage_of(data)


def usage_of(data: Any) -> Usage | None:
    """The ``usage`` of a parsed response object (or SSE chunk), validated.

    Accepts OpenAI's ``prompt_tokens``/``completion_tokens`` and the Responses API's
    ``input_tokens``/``output_tokens``. A block with a bad count is reported and ignored.
    """
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    counts = (_token_count(0 if prompt is None else prompt),
              _token_count(0 if completion is None else completion))  # fmt: skip
    if counts[0] is None or counts[1] is None:
        log.warning(
            "ignoring a usage block with impossible token counts: prompt_tokens=%.40r "
            "completion_tokens=%.40r",
            prompt,
            completion,
        )
        return None
    model = data.get("model")
    return Usage(counts[0], counts[1], model if isinstance(model, str) else "")


class UsageReader:
    """Finds the usage in a response body fed chunk by chunk (Envoy STREAMED or BUFFERED).

    ``text/event-stream`` bodies are read event by event, keeping only the unfinished line;
    anything else is collected as JSON up to ``max_bytes`` and parsed at :meth:`finish`.
    ``gzip`` and ``deflate`` bodies are inflated on the way; with any other encoding the
    usage cannot be read and :attr:`usage` stays None.
    """

    def __init__(self, content_type: str, content_encoding: str, max_bytes: int) -> None:
        self._max = max_bytes
        self._sse = _SSE_TYPE in content_type.lower()
        self._inflate: Any = None
        self._usable = True
        self._json = bytearray()
        self._events = SseUsage(max_bytes)
        self._usage: Usage | None = None
        encoding = content_encoding.strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            # wbits 32+15: accept both zlib and gzip headers (servers mix up "deflate").
            self._inflate = zlib.decompressobj(32 + zlib.MAX_WBITS)
        elif encoding not in ("", "identity"):
            log.warning("cannot read usage from a %r-encoded response body", encoding)
            self._usable = False

    @property
    def usage(self) -> Usage | None:
        """The usage found so far (for SSE, the last chunk that had one)."""
        return self._events.usage if self._sse else self._usage

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body."""
        if not self._usable or not chunk:
            return
        if self._inflate is None:
            self._take(chunk)
            return
        data = chunk
        try:
            while data and self._usable:
                self._take(self._inflate.decompress(data, _INFLATE_STEP))
                data = self._inflate.unconsumed_tail
        except zlib.error as exc:
            log.warning("cannot inflate the response body: %s", exc)
            self._usable = False

    def finish(self) -> Usage | None:
        """The body is complete: the usage it reported, if any."""
        if not self._usable:
            return None
        if self._sse:
            self._events.finish()
        elif self._json:
            self._usage = usage_from_json(bytes(self._json))
            self._json.clear()
        return self.usage

    def _take(self, data: bytes) -> None:
        if self._sse:
            self._events.feed(data)
        elif len(self._json) + len(data) > self._max:
            log.warning("response body is larger than %d bytes: usage not read", self._max)
            self._usable = False
            self._json.clear()
        else:
            self._json += data


class SseUsage:
    """An incremental Server-Sent Events reader that keeps the last ``usage`` it saw.

    Follows the SSE framing: lines end in LF, CRLF or CR; ``data:`` lines of one event are
    joined with newlines; a blank line ends the event. Lines longer than ``max_line`` are
    skipped (they cannot be a usage chunk budgetd would trust).
    """

    def __init__(self, max_line: int) -> None:
        self._max = max_line
        self._line = bytearray()
        self._skipping = False
        self._data: list[bytes] = []
        self._pending_cr = False
        self.usage: Usage | None = None
        self.done = False

    def feed(self, chunk: bytes) -> None:
        """Consume the next bytes of the stream."""
        start = 0
        if self._pending_cr and chunk[:1] == b"\n":
            start = 1  # the LF of a CRLF split across two chunks
        self._pending_cr = False
        while start < len(chunk):
            cut = _next_eol(chunk, start)
            if cut < 0:
                self._append(chunk[start:])
                return
            self._append(chunk[start:cut])
            self._end_line()
            if chunk[cut : cut + 1] == b"\r":
                if cut + 1 == len(chunk):
                    self._pending_cr = True
                elif chunk[cut + 1 : cut + 2] == b"\n":
                    cut += 1
            start = cut + 1

    def finish(self) -> None:
        """End of stream: an unterminated last line and event still count."""
        if self._line:
            self._end_line()
        self._dispatch()

    def _append(self, data: bytes) -> None:
        if self._skipping:
            return
        if len(self._line) + len(data) > self._max:
            self._skipping = True
            self._line.clear()
            return
        self._line += data

    def _end_line(self) -> None:
        line, skipped = bytes(self._line), self._skipping
        self._line.clear()
        self._skipping = False
        if skipped:
            return
        if not line:
            self._dispatch()
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)

    def _dispatch(self) -> None:
        if not self._data:
            return
        data = b"\n".join(self._data)
        self._data = []
        if data.strip() == b"[DONE]":
            self.done = True
            return
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return
        found = usage_of(parsed)
        if found is not None:
            self.usage = found


def _next_eol(chunk: bytes, start: int) -> int:
    lf, cr = chunk.find(b"\n", start), chunk.find(b"\r", start)
    if lf < 0:
        return cr
    return lf if cr < 0 else min(lf, cr)


def _token_count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_TOKENS else None


def _text_chars(value: Any) -> int:
    """Characters of prompt text in ``messages``, ``prompt`` or ``input`` (any nesting).

    A token id (``"prompt": [[1734, 30]]``) counts as one token's worth of characters.
    """
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return CHARS_PER_TOKEN
    if isinstance(value, list):
        return sum(_text_chars(item) for item in value)
    if isinstance(value, dict):
        # A chat message ({"role", "content"}) or a content part ({"type": "text", "text"}).
        return _text_chars(value.get("content")) + _text_chars(value.get("text"))
    return 0


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
