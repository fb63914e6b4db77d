"""OpenAI-style bodies: request facts, usage from JSON and from SSE streams fed in pieces."""

from __future__ import annotations

import gzip
import json
import logging
import zlib

import pytest

from server.envoy.openai import (
    BodyTooLarge,
    MalformedBody,
    RequestFacts,
    SseUsage,
    Usage,
    UsageReader,
    is_json_type,
    parse_request,
    usage_from_json,
    usage_of,
)

LIMIT = 1024 * 1024


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def sse(*chunks: object, done: bool = True) -> bytes:
    lines = [f"data: {json.dumps(chunk)}\n\n" for chunk in chunks]
    if done:
        lines.append("data: [DONE]\n\n")
    return "".join(lines).encode()


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "model": "llama3", "usage": None}
USAGE = {"prompt_tokens": 7, "completion_tokens": 13, "total_tokens": 20}
STREAM = sse(
    {**CHUNK, "choices": [{"delta": {"content": "Hel"}}]},
    {**CHUNK, "choices": [{"delta": {"content": "lo"}}]},
    {**CHUNK, "choices": [], "usage": USAGE},
)


# -- requests ---------------------------------------------------------------------------


def test_request_facts_of_a_chat_completion() -> None:
    facts = parse_request(
        body(model="llama3", max_tokens=50, messages=[{"role": "user", "content": "hi there!"}]),
        LIMIT,
        "application/json",
    )
    # "hi there!" is 9 characters: ceil(9 / 4) = 3 tokens.
    assert facts == RequestFacts(model="llama3", max_tokens=50, prompt_tokens=3, stream=False)


TEXT_PART = {"type": "text", "text": "efgh"}
IMAGE_PART = {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}}


def test_max_completion_tokens_wins_and_content_parts_count() -> None:
    facts = parse_request(
        body(
            model="gpt-4o",
            max_tokens=10,
            max_completion_tokens=99,
            stream=True,
            messages=[
                {"role": "system", "content": "abcd"},
                {"role": "user", "content": [TEXT_PART, IMAGE_PART]},
            ],
        ),
        LIMIT,
    )
    assert facts == RequestFacts(model="gpt-4o", max_tokens=99, prompt_tokens=2, stream=True)


def test_prompt_and_input_fields_count_and_token_ids_are_tokens() -> None:
    assert parse_request(body(model="m", prompt="x" * 40), LIMIT).prompt_tokens == 10
    assert parse_request(body(model="m", prompt=[[1, 2, 3]]), LIMIT).prompt_tokens == 3
    assert parse_request(body(model="m", input=["abcd", "efgh"]), LIMIT).prompt_tokens == 2


def test_empty_and_non_json_bodies_give_no_facts() -> None:
    assert parse_request(b"", LIMIT) == RequestFacts()
    assert parse_request(b"  \n", LIMIT, "application/json") == RequestFacts()
    multipart = b"--x\r\nContent-Disposition: form-data; name=model\r\n\r\nwhisper\r\n--x--"
    assert parse_request(multipart, LIMIT, "multipart/form-data; boundary=x") == RequestFacts()
    assert parse_request(body(model="m"), LIMIT, "application/vnd.api+json").model == "m"
    assert is_json_type("Application/JSON; charset=utf-8") and not is_json_type("text/plain")


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"[1, 2]",
        b'"a string"',
        b"\xff\xfe\x00garbage",
        body(model=42),
        body(model="m" * 300),
        body(model="m", max_tokens=-1),
        body(model="m", max_tokens=10**9 + 1),
        body(model="m", max_tokens=1.5),
        body(model="m", max_tokens=True),
        body(model="m", max_completion_tokens="100"),
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_malformed_bodies_are_refused_with_400(raw: bytes) -> None:
    with pytest.raises(MalformedBody) as err:
        parse_request(raw, 10 * LIMIT)
    assert err.value.status == 400


def test_deeply_nested_messages_are_refused_not_crashed() -> None:
    nested = '{"model": "m", "messages": ' + "[" * 900 + "]" * 900 + "}"
    try:
        facts = parse_request(nested.encode(), LIMIT)
    except MalformedBody:
        return
    assert facts.prompt_tokens is None


def test_a_body_over_the_limit_is_refused_with_413() -> None:
    raw = body(model="m", messages=[{"role": "user", "content": "x" * 2000}])
    with pytest.raises(BodyTooLarge) as err:
        parse_request(raw, 1000)
    assert err.value.status == 413
    assert parse_request(raw, len(raw)).prompt_tokens == 500


# -- usage from JSON --------------------------------------------------------------------


def test_usage_from_a_json_response() -> None:
    response = {"id": "x", "model": "llama3-2024", "choices": [], "usage": USAGE}
    assert usage_from_json(json.dumps(response).encode()) == Usage(7, 13, "llama3-2024")
    assert usage_from_json(b'{"usage": {"input_tokens": 4, "output_tokens": 2}}') == Usage(4, 2)
    assert usage_from_json(b'{"usage": {"prompt_tokens": 4, "total_tokens": 4}}') == Usage(4, 0)


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"{}", b'{"usage": null}', b'{"usage": {}}', b'{"error": {}}']
)
def test_responses_without_usage(raw: bytes) -> None:
    assert usage_from_json(raw) is None


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": 10**9 + 1},
        {"prompt_tokens": 1e30, "completion_tokens": 5},
        {"prompt_tokens": "5", "completion_tokens": 5},
        {"prompt_tokens": 5, "completion_tokens": True},
        {"prompt_tokens": 5.5, "completion_tokens": 1},
    ],
)
def test_impossible_token_counts_are_no_usage_with_a_warning(
    usage: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="budgetd.envoy"):
        assert usage_of({"usage": usage}) is None
    assert "impossible token counts" in caplog.text


def test_the_largest_allowed_count_is_accepted() -> None:
    assert usage_of({"usage": {"prompt_tokens": 10**9, "completion_tokens": 0}}) == Usage(10**9, 0)


# -- usage from SSE ---------------------------------------------------------------------


def test_sse_usage_in_one_piece() -> None:
    reader = SseUsage(LIMIT)
    reader.feed(STREAM)
    assert reader.usage == Usage(7, 13, "llama3") and reader.done


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_sse_usage_fed_in_pieces_of_any_size(size: int) -> None:
    reader = SseUsage(LIMIT)
    for start in range(0, len(STREAM), size):
        reader.feed(STREAM[start : start + size])
    reader.finish()
    assert reader.usage == Usage(7, 13, "llama3") and reader.done


@pytest.mark.parametrize("size", [1, 5, len(STREAM)])
def test_sse_with_crlf_and_cr_line_ends(size: int) -> None:
    for newline in (b"\r\n", b"\r"):
        stream = STREAM.replace(b"\n", newline)
        reader = SseUsage(LIMIT)
        for start in range(0, len(stream), size):
            reader.feed(stream[start : start + size])
        assert reader.usage == Usage(7, 13, "llama3"), newline


def test_sse_framing_details() -> None:
    stream = (
        b": keep-alive comment\n\n"
        b"event: message\nid: 1\ndata:" + json.dumps({"usage": {"prompt_tokens": 1}}).encode()
        + b"\n\n"
        b'data: {"usage":\ndata: {"prompt_tokens": 2, "completion_tokens": 3}}\n\n'
        b"data: [DONE]\n\n"
    )  # fmt: skip
    reader = SseUsage(LIMIT)
    reader.feed(stream)
    # The multi-line event is joined with a newline, which is valid JSON whitespace.
    assert reader.usage == Usage(2, 3)


def test_the_last_usage_wins_and_a_final_event_without_blank_line_counts() -> None:
    cumulative = (
        sse({"usage": {"prompt_tokens": 5, "completion_tokens": 1}}, done=False)
        + b'data: {"usage": {"prompt_tokens": 5, "completion_tokens": 9}}'
    )
    reader = SseUsage(LIMIT)
    reader.feed(cumulative)
    assert reader.usage == Usage(5, 1)
    reader.finish()
    assert reader.usage == Usage(5, 9) and not reader.done


def test_a_stream_cut_before_the_usage_chunk_has_no_usage() -> None:
    cut = STREAM[: STREAM.index(b'"usage": {')]
    reader = SseUsage(LIMIT)
    reader.feed(cut)
    reader.finish()
    assert reader.usage is None and not reader.done


def test_sse_usage_with_impossible_counts_is_ignored() -> None:
    reader = SseUsage(LIMIT)
    reader.feed(sse({"usage": {"prompt_tokens": -3, "completion_tokens": 2}}))
    assert reader.usage is None and reader.done


def test_overlong_sse_lines_are_skipped() -> None:
    reader = SseUsage(100)
    reader.feed(b"data: " + b"x" * 500 + b"\n\n")
    reader.feed(sse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
    assert reader.usage == Usage(1, 1)


# -- the response reader (what ext_proc uses) --------------------------------------------


def test_reader_json_in_pieces() -> None:
    raw = json.dumps({"model": "m", "usage": USAGE}).encode()
    reader = UsageReader("application/json", "", LIMIT)
    for start in range(0, len(raw), 5):
        reader.feed(raw[start : start + 5])
    assert reader.usage is None  # JSON is read when complete
    assert reader.finish() == Usage(7, 13, "m")


def test_reader_sse() -> None:
    reader = UsageReader("text/event-stream; charset=utf-8", "", LIMIT)
    reader.feed(STREAM[:50])
    reader.feed(STREAM[50:])
    assert reader.finish() == Usage(7, 13, "llama3")


def test_reader_gives_up_on_json_over_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    raw = json.dumps({"pad": "x" * 200, "usage": USAGE}).encode()
    reader = UsageReader("application/json", "", 100)
    with caplog.at_level(logging.WARNING, logger="budgetd.envoy"):
        reader.feed(raw)
        assert reader.finish() is None
    assert "larger than 100 bytes" in caplog.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_reader_inflates_compressed_bodies(encoding: str) -> None:
    raw = json.dumps({"usage": USAGE}).encode()
    packed = gzip.compress(raw) if encoding == "gzip" else zlib.compress(raw)
    reader = UsageReader("application/json", encoding, LIMIT)
    for start in range(0, len(packed), 3):
        reader.feed(packed[start : start + 3])
    assert reader.finish() == Usage(7, 13)
    streamed = UsageReader("text/event-stream", encoding, LIMIT)
    streamed.feed(gzip.compress(STREAM) if encoding == "gzip" else zlib.compress(STREAM))
    assert streamed.finish() == Usage(7, 13, "llama3")


def test_reader_refuses_a_compression_bomb_without_inflating_it() -> None:
    bomb = gzip.compress(b'{"pad": "' + b"x" * (50 * LIMIT))
    reader = UsageReader("application/json", "gzip", LIMIT)
    reader.feed(bomb)
    assert reader.finish() is None


def test_reader_cannot_read_unknown_encodings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="budgetd.envoy"):
        reader = UsageReader("application/json", "br", LIMIT)
    reader.feed(b"\x1b\x00garbage")
    assert reader.finish() is None
    assert "'br'-encoded" in caplog.text
    broken = UsageReader("application/json", "gzip", LIMIT)
    broken.feed(b"not gzip at all")
    assert broken.finish() is None
