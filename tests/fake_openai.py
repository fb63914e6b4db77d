"""A small OpenAI-compatible upstream for gateway tests (aiohttp, in process).

``POST /chat/completions`` (and ``/v1/chat/completions``) answers a chat completion with a
``usage`` block; with ``"stream": true`` it answers Server-Sent Events whose last data chunk
carries ``usage``, then ``data: [DONE]``. What it does is set on :class:`Behaviour` between
requests; every request it receives is kept in :attr:`FakeOpenAI.requests`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

from aiohttp import web

from services import HOST

DEFAULT_USAGE = {"prompt_tokens": 15, "completion_tokens": 10, "total_tokens": 25}


@dataclasses.dataclass
class Behaviour:
    """How the next responses look.

    ``mode``: ``ok``; ``fail`` (500 with an OpenAI error body and no usage); ``cut`` (SSE:
    the connection is dropped after the first chunk); ``stall`` (SSE: after the first chunk
    nothing more is sent until the client goes away, at most ``stall_seconds``).
    """

    usage: dict[str, Any] | None = dataclasses.field(default_factory=lambda: dict(DEFAULT_USAGE))
    cost_header: str | None = None
    mode: str = "ok"
    stall_seconds: float = 15.0


@dataclasses.dataclass
class Received:
    """One request as the upstream saw it (header names lowercased)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    """The fake upstream; ``await start()`` binds a free port on 127.0.0.1 unless one is given."""

    def __init__(self, port: int = 0) -> None:
        self.behaviour = Behaviour()
        self.requests: list[Received] = []
        self.port = port
        self._runner: web.AppRunner | None = None
        # Set when a stalled stream notices its client has gone.
        self.client_gone = asyncio.Event()

    async def start(self) -> int:
        app = web.Application()
        for path in ("/chat/completions", "/v1/chat/completions"):
            app.router.add_post(path, self._chat)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, self.port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            Received(request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        behaviour = self.behaviour
        headers = {}
        if behaviour.cost_header is not None:
            headers["x-litellm-response-cost"] = behaviour.cost_header
        if behaviour.mode == "fail":
            error = {"error": {"message": "the model is overloaded", "type": "server_error"}}
            return web.json_response(error, status=500)
        model = str(body.get("model", ""))
        if body.get("stream") is True:
            return await self._stream(request, model, headers)
        answer = {**_chunk(model, "chat.completion"), "choices": [_choice("Hello!", "message")]}
        if behaviour.usage is not None:
            answer["usage"] = behaviour.usage
        return web.json_response(answer, headers=headers)

    async def _stream(
        self, request: web.Request, model: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        behaviour = self.behaviour
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache", **headers}
        )
        await response.prepare(request)
        chunk = _chunk(model, "chat.completion.chunk")
        await _event(response, {**chunk, "choices": [_choice("Hel", "delta")], "usage": None})
        if behaviour.mode == "cut":
            await _flushed(request)
            assert request.transport is not None
            request.transport.abort()  # the upstream dies mid-stream
            return response
        if behaviour.mode == "stall":
            await self._stall(request, behaviour.stall_seconds)
            return response
        last = _choice("lo!", "delta", finish="stop")
        await _event(response, {**chunk, "choices": [last], "usage": None})
        if behaviour.usage is not None:
            await _event(response, {**chunk, "choices": [], "usage": behaviour.usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _stall(self, request: web.Request, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                await asyncio.sleep(0.02)
        finally:
            # Reached when the client's disconnect cancels this handler, too.
            self.client_gone.set()


def _chunk(model: str, kind: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": kind, "created": 1718318916, "model": model}


def _choice(text: str, key: str, finish: str | None = None) -> dict[str, Any]:
    finish = "stop" if key == "message" else finish
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


async def _flushed(request: web.Request) -> None:
    """Wait until what was written has left the process (abort() discards the rest)."""
    transport = request.transport
    for _ in range(1000):
        if transport is None or transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # and give the gateway a moment to pass it on


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())
