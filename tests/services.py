"""Throwaway PostgreSQL and Redis servers for the test suite.

Both servers are started from the machine's own binaries on a free TCP port on 127.0.0.1, with
all their files in a temporary directory that is removed when they stop. Nothing here touches a
system-wide Postgres or Redis.

The methods that start, stop or restart a server are coroutines so they never block the event
loop: a budgetd running in-process on the same loop keeps serving while a fault test restarts
its Redis. Child processes are driven with :mod:`subprocess` and polled, so a server object is
not tied to the event loop that started it.

When ``BUDGETD_TEST_DATABASE_URL`` / ``BUDGETD_TEST_REDIS_URL`` are set, the fixtures use
:meth:`PostgresServer.external` / :meth:`RedisServer.external` instead: such a server is not ours,
so it cannot be stopped or restarted (:attr:`managed` is false) and tests that need to do that
should skip.

Postgres refuses to run as root. Under euid 0 ``initdb`` and ``pg_ctl`` run as the ``postgres``
OS user (created by Debian's package) or, failing that, as a system user ``budgetd-test`` that is
created on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

HOST = "127.0.0.1"
"""Every throwaway server listens on this address only."""

PG_SUPERUSER = "postgres"
"""Name of the superuser role created by ``initdb`` (the same whoever runs the tests)."""

PG_OS_USER = "postgres"
"""OS user that runs Postgres when the tests run as root (Debian's package creates it)."""

FALLBACK_OS_USER = "budgetd-test"
"""System user created to run Postgres under root when there is no ``postgres`` OS user."""

STARTUP_TIMEOUT = 60.0
"""Seconds a server may take to accept connections before its start is reported as failed."""

_START_ATTEMPTS = 3  # a free port can be taken by someone else before the server binds it
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class ServiceError(RuntimeError):
    """A throwaway server could not be found, started or stopped."""


class ExternalServerError(ServiceError):
    """Raised when asked to start, stop or restart a server this harness does not own."""


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now.

    The port is only free at the moment of the call: start servers with a retry (as the classes
    here do) since another process may bind it first.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


async def _run(argv: Sequence[str], *, cwd: Path, time_limit: float = STARTUP_TIMEOUT) -> None:
    """Run a short command in a worker thread; raise ServiceError with its output on failure."""
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=time_limit,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ServiceError(
            f"{argv[0]} timed out after {time_limit:.0f}s: {' '.join(argv)}"
        ) from exc
    if done.returncode != 0:
        raise ServiceError(
            f"command failed with exit code {done.returncode}: {' '.join(argv)}\n"
            f"{done.stdout}{done.stderr}"
        )


def _replace_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, parts.fragment))


# --------------------------------------------------------------------------------------------
# PostgreSQL


def find_postgres_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    A directory on ``PATH`` with all three wins; otherwise the newest
    ``/usr/lib/postgresql/<version>/bin`` (where Debian's ``postgresql`` package puts them).
    """
    tools = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("pg_ctl")
    if found is not None:
        # Resolve symlinks: initdb looks for `postgres` next to its own real path.
        bin_dir = Path(found).resolve().parent
        if all((bin_dir / tool).is_file() for tool in tools):
            return bin_dir

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates = [
        path
        for path in Path("/usr/lib/postgresql").glob("*/bin")
        if all((path / tool).is_file() for tool in tools)
    ]
    if not candidates:
        raise ServiceError(
            "PostgreSQL server binaries not found (initdb, pg_ctl, postgres on PATH or under "
            "/usr/lib/postgresql/*/bin): install them, e.g. `apt-get install postgresql`, or set "
            "BUDGETD_TEST_DATABASE_URL to use an existing server"
        )
    return max(candidates, key=version)


def _os_user_for_postgres() -> pwd.struct_passwd:
    """The unprivileged OS user that runs Postgres when the tests run as root."""
    for name in (PG_OS_USER, FALLBACK_OS_USER):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    # Another test process may be creating it concurrently: check again before failing.
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            FALLBACK_OS_USER,
        ],
        capture_output=True,
        check=False,
    )
    try:
        return pwd.getpwnam(FALLBACK_OS_USER)
    except KeyError:
        raise ServiceError(
            f"running as root and could not create the OS user {FALLBACK_OS_USER!r} to run "
            "Postgres (Postgres refuses to run as root)"
        ) from None


def _as_user(user: pwd.struct_passwd | None, argv: Sequence[str]) -> list[str]:
    if user is None:
        return list(argv)
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", user.pw_name, "--", *argv]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [
            setpriv,
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
            *argv,
        ]
    raise ServiceError("running as root, but neither runuser nor setpriv is available")


def _traversable_by_others(directory: Path) -> bool:
    """True when every ancestor of ``directory`` lets any user search it (o+x)."""
    for path in (directory, *directory.parents):
        try:
            if not path.stat().st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    return True


def _make_temp_dir(prefix: str, owner: pwd.struct_passwd | None) -> Path:
    base = Path(tempfile.gettempdir())
    if owner is not None and not _traversable_by_others(base):
        base = Path("/tmp")  # the other user must be able to reach its own directory
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


async def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``; return the URL that opens it."""
    if not _DB_NAME.match(name):
        raise ValueError(f"not a safe database name: {name!r}")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _replace_path(admin_url, "/" + name)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (if it exists) on the server of ``admin_url``.

    Connections still open to it, such as a pool a test forgot to close, are terminated.
    """
    if not _DB_NAME.match(name):
        raise ValueError(f"not a safe database name: {name!r}")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await conn.close()


def random_database_name(prefix: str = "budgetd_test_") -> str:
    """A fresh database name: ``prefix`` followed by 16 random hex digits."""
    return prefix + secrets.token_hex(8)


@dataclass
class _PgCluster:
    root: Path
    os_user: pwd.struct_passwd | None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"


class PostgresServer:
    """A throwaway PostgreSQL cluster (or, via :meth:`external`, an existing server).

    ``await start()`` runs ``initdb`` into a temporary directory (trust authentication,
    superuser ``postgres``, ``fsync=off``) and starts it on a free port on 127.0.0.1 with its
    unix socket in that directory; ``await stop()`` stops it with ``pg_ctl stop -m immediate``
    and removes the directory; ``await restart()`` stops it the same way and starts it again on
    the same port, keeping its data (Postgres runs crash recovery, as after a real crash);
    ``await halt()`` only stops it that way, for an outage that lasts until ``start()``.
    Also an async context manager.
    """

    def __init__(self, bin_dir: Path | None = None) -> None:
        """Prepare a server; ``bin_dir`` defaults to :func:`find_postgres_bin_dir`."""
        self._bin_dir = bin_dir
        self._cluster: _PgCluster | None = None
        self._running = False
        self._port: int | None = None
        self._external_url: str | None = None

    @classmethod
    def external(cls, url: str) -> PostgresServer:
        """Wrap an existing server; ``url`` must name a superuser (or CREATEDB) role."""
        server = cls()
        server._external_url = url
        return server

    @property
    def managed(self) -> bool:
        """True when this harness started the server (and so may stop or restart it)."""
        return self._external_url is None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._external_url is not None:
            return urlsplit(self._external_url).port or 5432
        if self._port is None:
            raise ServiceError("PostgresServer has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        """The postmaster's process id (its backends are its children); None when this
        harness did not start the server or it is not running."""
        if self._cluster is None or not self._running:
            return None
        try:
            return int((self._cluster.data / "postmaster.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    @property
    def url(self) -> str:
        """``postgresql://`` URL of the server's ``postgres`` database as the superuser."""
        if self._external_url is not None:
            return self._external_url
        return f"postgresql://{PG_SUPERUSER}@{HOST}:{self.port}/postgres"

    @property
    def log_path(self) -> Path | None:
        """The server's log file (None for an external server or before the first start)."""
        return self._cluster.log if self._cluster is not None else None

    async def create_database(self, name: str) -> str:
        """Create database ``name`` on this server and return its URL."""
        return await create_database(self.url, name)

    async def drop_database(self, name: str) -> None:
        """Drop database ``name`` from this server, ending any connection to it."""
        await drop_database(self.url, name)

    def _require_managed(self, action: str) -> None:
        if self._external_url is not None:
            raise ExternalServerError(f"cannot {action} the external Postgres server {self.url}")

    def _pg(self, tool: str, *args: str) -> list[str]:
        assert self._bin_dir is not None and self._cluster is not None
        return _as_user(self._cluster.os_user, [str(self._bin_dir / tool), *args])

    async def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts connections."""
        self._require_managed("start")
        if self._running:
            return
        if self._cluster is None:
            if self._bin_dir is None:
                self._bin_dir = find_postgres_bin_dir()
            os_user = _os_user_for_postgres() if os.geteuid() == 0 else None
            self._cluster = _PgCluster(_make_temp_dir("budgetd-pg-", os_user), os_user)
            try:
                await self._initdb()
            except BaseException:
                shutil.rmtree(self._cluster.root, ignore_errors=True)
                self._cluster = None
                raise
        if self._port is not None:  # a restart keeps its port (clients keep their URL)
            await self._start_on(self._port)
            return
        for attempt in range(_START_ATTEMPTS):
            try:
                await self._start_on(free_port())
                return
            except ServiceError:
                if attempt == _START_ATTEMPTS - 1:
                    raise

    async def _initdb(self) -> None:
        assert self._cluster is not None
        await _run(
            self._pg(
                "initdb",
                "--pgdata",
                str(self._cluster.data),
                "--username",
                PG_SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ),
            cwd=self._cluster.root,
        )

    async def _start_on(self, port: int) -> None:
        assert self._cluster is not None
        cluster = self._cluster
        if _port_in_use(port):
            raise ServiceError(f"port {port} is already in use")
        options = {
            "listen_addresses": f"'{HOST}'",
            "port": str(port),
            "unix_socket_directories": f"'{cluster.root}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        # postgresql.auto.conf is read last, so the current port overrides earlier ones.
        auto_conf = cluster.data / "postgresql.auto.conf"
        auto_conf.write_text("".join(f"{key} = {value}\n" for key, value in options.items()))
        try:
            await _run(
                self._pg(
                    "pg_ctl",
                    "start",
                    "--pgdata",
                    str(cluster.data),
                    "--log",
                    str(cluster.log),
                    "--wait",
                    "--timeout",
                    str(int(STARTUP_TIMEOUT)),
                ),
                cwd=cluster.root,
                time_limit=STARTUP_TIMEOUT + 10,
            )
        except ServiceError as exc:
            await self._pg_ctl_stop(check=False)
            raise ServiceError(f"{exc}\npostgres log:\n{_tail(cluster.log)}") from exc
        self._port = port
        self._running = True
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                conn = await asyncpg.connect(self.url, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise ServiceError(f"Postgres on port {self.port} not ready: {exc}") from exc
                await asyncio.sleep(0.1)
            else:
                await conn.close()
                return

    async def _pg_ctl_stop(self, *, check: bool) -> None:
        assert self._cluster is not None
        argv = self._pg(
            "pg_ctl", "stop", "--pgdata", str(self._cluster.data), "--mode", "immediate", "--wait"
        )
        try:
            await _run(argv, cwd=self._cluster.root)
        except ServiceError:
            if check:
                raise

    async def restart(self) -> None:
        """Stop the server immediately (as a crash would) and start it again on the same port."""
        await self.halt()
        await self.start()

    async def halt(self) -> None:
        """Stop the server immediately (as a crash would), keeping its data and port.

        Clients see an outage until :meth:`start` brings it back, crash recovery and all.
        """
        self._require_managed("halt")
        if self._running:
            await self._pg_ctl_stop(check=True)
            self._running = False

    async def stop(self) -> None:
        """Stop the server (``pg_ctl stop -m immediate``) and delete all its files."""
        self._require_managed("stop")
        if self._cluster is None:
            return
        try:
            if self._running:
                await self._pg_ctl_stop(check=False)
        finally:
            self._running = False
            shutil.rmtree(self._cluster.root, ignore_errors=True)
            self._cluster = None
            self._port = None

    async def __aenter__(self) -> Self:
        """Start the server (a no-op for an external one)."""
        if self.managed:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (a no-op for an external one)."""
        if self.managed:
            await self.stop()


# --------------------------------------------------------------------------------------------
# Redis


def find_redis_server() -> str:
    """Return the path of ``redis-server`` (on ``PATH``, or Debian's ``/usr/bin``)."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found is None:
        raise ServiceError(
            "redis-server not found: install it, e.g. `apt-get install redis-server`, or set "
            "BUDGETD_TEST_REDIS_URL to use an existing server"
        )
    return found


async def flush_redis(url: str, *, everything: bool) -> None:
    """Delete the keys of the DB named in ``url`` (``FLUSHDB``) or of all DBs (``FLUSHALL``)."""
    client = aioredis.Redis.from_url(url)
    try:
        if everything:
            await client.flushall()
        else:
            await client.flushdb()
    finally:
        await client.aclose()


class RedisServer:
    """A throwaway ``redis-server`` (or, via :meth:`external`, an existing one).

    ``await start()`` starts it on a free port on 127.0.0.1 (or the ``port`` given) with no
    persistence (``--save "" --appendonly no``) and waits until it answers PING; ``await stop()``
    stops it and removes its directory; ``await restart()`` stops it and starts a new, empty
    server on the same port, so clients keep their URL but lose every key, as after a crash.
    Start as many as a test needs. Also an async context manager.
    """

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        """Prepare a server; ``port`` defaults to a free port chosen at the first start."""
        self._port = port
        self._extra_args = tuple(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._external_url: str | None = None

    @classmethod
    def external(cls, url: str) -> RedisServer:
        """Wrap an existing server reached at ``url``."""
        server = cls()
        server._external_url = url
        return server

    @property
    def managed(self) -> bool:
        """True when this harness started the server (and so may stop or restart it)."""
        return self._external_url is None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._external_url is not None:
            return urlsplit(self._external_url).port or 6379
        if self._port is None:
            raise ServiceError("RedisServer has not been started")
        return self._port

    @property
    def pid(self) -> int | None:
        """redis-server's process id; None when this harness did not start it or it exited."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    @property
    def url(self) -> str:
        """``redis://`` URL of the server's DB 0 (the given URL for an external server)."""
        if self._external_url is not None:
            return self._external_url
        return f"redis://{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server process is alive (always True for an external server)."""
        if self._external_url is not None:
            return True
        return self._process is not None and self._process.poll() is None

    def _require_managed(self, action: str) -> None:
        if self._external_url is not None:
            raise ExternalServerError(f"cannot {action} the external Redis server {self.url}")

    async def start(self) -> None:
        """Start the server and wait until it answers PING (a no-op when it is running)."""
        self._require_managed("start")
        if self.running:
            return
        if self._port is not None:
            await self._start_on(self._port)
            return
        for attempt in range(_START_ATTEMPTS):
            try:
                await self._start_on(free_port())
                return
            except ServiceError:
                if attempt == _START_ATTEMPTS - 1:
                    raise

    async def _start_on(self, port: int) -> None:
        if _port_in_use(port):
            raise ServiceError(f"port {port} is already in use")
        directory = Path(tempfile.mkdtemp(prefix="budgetd-redis-"))
        log = directory / "redis.log"
        argv = [
            find_redis_server(),
            "--bind",
            HOST,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(log),
            "--daemonize",
            "no",
            *self._extra_args,
        ]
        process = await asyncio.to_thread(
            subprocess.Popen, argv, stdin=subprocess.DEVNULL, cwd=directory
        )
        self._process, self._dir = process, directory
        deadline = time.monotonic() + STARTUP_TIMEOUT
        client = aioredis.Redis(host=HOST, port=port, socket_connect_timeout=1)
        try:
            while True:
                if process.poll() is not None:
                    message = f"redis-server exited with {process.returncode}:\n{_tail(log)}"
                    await self._cleanup()
                    raise ServiceError(message)
                try:
                    if await client.ping():
                        self._port = port
                        return
                except (OSError, aioredis.RedisError):
                    pass
                if time.monotonic() > deadline:
                    await self._cleanup()
                    raise ServiceError(f"redis-server on port {port} did not answer PING")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def _cleanup(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, 10)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def stop(self) -> None:
        """Stop the server and remove its directory; its port is kept for a later start."""
        self._require_managed("stop")
        await self._cleanup()

    async def restart(self) -> None:
        """Stop the server and start a fresh, empty one on the same port."""
        self._require_managed("restart")
        await self._cleanup()
        await self.start()

    async def __aenter__(self) -> Self:
        """Start the server (a no-op for an external one)."""
        if self.managed:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (a no-op for an external one)."""
        if self.managed:
            await self.stop()


_CLUSTER_NODE_ARGS = (
    *("--cluster-enabled", "yes"),
    *("--cluster-config-file", "nodes.conf"),
    *("--cluster-node-timeout", "2000"),
)


class RedisClusterServers:
    """A throwaway 3-master Redis Cluster: three ``redis-server --cluster-enabled yes`` and
    ``redis-cli --cluster create``. ``url`` is a ``redis+cluster://`` seed URL."""

    NODES = 3

    def __init__(self) -> None:
        self.nodes = [
            RedisServer(port=_cluster_port(), extra_args=_CLUSTER_NODE_ARGS)
            for _ in range(self.NODES)
        ]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.nodes[0].port}"

    async def start(self) -> None:
        """Start the nodes, join them into one cluster, wait until every slot is served."""
        for index in range(len(self.nodes)):
            for attempt in range(_START_ATTEMPTS):
                try:
                    await self.nodes[index].start()
                    break
                except ServiceError:
                    # The port or its cluster-bus twin was taken meanwhile: try another pair.
                    if attempt == _START_ATTEMPTS - 1:
                        raise
                    self.nodes[index] = RedisServer(
                        port=_cluster_port(), extra_args=_CLUSTER_NODE_ARGS
                    )
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        addresses = [f"{HOST}:{node.port}" for node in self.nodes]
        await _run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            cwd=Path(tempfile.gettempdir()),
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for node in self.nodes:
            while "cluster_state:ok" not in await _cluster_info(cli, node.port):
                if time.monotonic() > deadline:
                    raise ServiceError("redis cluster did not reach cluster_state:ok")
                await asyncio.sleep(0.1)

    async def flush(self) -> None:
        """Delete every key on every master."""
        for node in self.nodes:
            await flush_redis(node.url, everything=True)

    async def stop(self) -> None:
        for node in self.nodes:
            await node.stop()

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


async def _cluster_info(cli: str, port: int) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        [cli, "-h", HOST, "-p", str(port), "cluster", "info"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return done.stdout


def _cluster_port() -> int:
    """A free port whose cluster-bus twin (port + 10000) is free too; both below 65536."""
    for _ in range(200):
        port = 20_000 + secrets.randbelow(30_000)
        if not _port_in_use(port) and not _port_in_use(port + 10_000):
            return port
    raise ServiceError("no free port pair for a Redis Cluster node")
