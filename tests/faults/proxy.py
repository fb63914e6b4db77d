"""A TCP fault proxy for the fault tests, in the spirit of asyncpg's test suite.

:class:`FaultProxy` listens on a free loopback port and relays every connection to a target
(a Postgres or Redis server). Point budgetd at the proxy instead of the server and the test
can break the network between them on cue:

* :meth:`FaultProxy.cut` resets every connection open right now (both sides get an RST, as
  when a middlebox or the peer's host dies), while new connections are still accepted;
* :meth:`FaultProxy.block` makes every new connection fail at once (accepted and reset, which
  a client sees exactly like a refused one), until :meth:`FaultProxy.unblock`.

A cut plus a block is an outage of the backend as seen from budgetd, while the backend itself
keeps running and the test can still read it directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
_CHUNK = 64 * 1024


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST (SO_LINGER 0), not a polite FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes one way until EOF or an error; then close the far side politely."""
    try:
        while chunk := await reader.read(_CHUNK):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        if not writer.transport.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()
            writer.close()


class FaultProxy:
    """Relays 127.0.0.1:<port> to ``target_host:target_port``; ``cut`` and ``block`` break it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._blocked = False
        self.port = 0
        self.accepted = 0
        self.refused = 0

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``, where clients connect."""
        return f"{HOST}:{self.port}"

    @property
    def connections(self) -> int:
        """Connections relayed right now."""
        return len(self._open)

    async def start(self) -> int:
        """Listen on a free loopback port; returns it."""
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def cut(self) -> int:
        """Reset every open connection (both sides); returns how many were cut."""
        pairs, self._open = self._open, set()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)
        return len(pairs)

    def block(self) -> None:
        """Fail every new connection at once until :meth:`unblock`."""
        self._blocked = True

    def unblock(self) -> None:
        """Relay new connections again."""
        self._blocked = False

    async def stop(self) -> None:
        """Stop listening and reset everything still open."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._blocked:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            self.refused += 1
            _reset(writer)
            return
        if self._blocked:  # blocked while we were connecting upstream
            self.refused += 1
            _reset(writer)
            _reset(up_writer)
            return
        self.accepted += 1
        pair = (writer, up_writer)
        self._open.add(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._open.discard(pair)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
