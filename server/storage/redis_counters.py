"""Counters in Redis (or Redis Cluster), shared by every budgetd replica.

Each operation is one EVALSHA of a Lua script in ``server/storage/lua/`` (KEYS and ARGV are
written at the top of each), so a decision is one atomic step however many replicas run.
The semantics are those of :mod:`server.storage.memory_counters`, and the same contract
tests run against both.

Key layout (``P`` is the prefix, ``T`` the team id percent-encoded so it cannot break out of
its hash tag):

* ``P:{t:T}:c:<counter_id>`` — hash ``{spend, held}`` in nano-USD, expiring after its
  window's end plus a grace period (no TTL for all-time counters);
* ``P:{t:T}:holds``   — hash ``reservation_id -> JSON [amount, counter key, ...]``;
* ``P:{t:T}:holdexp`` — zset ``reservation_id -> hold expiry`` (Unix seconds);
* ``P:{t:T}:done:<request_id>`` — settle dedupe marker, expiring after ``dedupe_ttl``.

Every key of a team carries the hash tag ``{t:T}``, so all keys one script touches share a
slot and the scripts run unchanged on Redis Cluster. Time always comes from the caller's
``now``, never from Redis ``TIME``; only the TTLs of counters and dedupe markers run on
Redis's own clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.resources import files
from typing import Any
from urllib.parse import quote

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    SettleResult,
)
from server.storage.memory_counters import (
    PURGE_LIMIT,
    check_nanos,
    check_scopes,
    counter_ttl,
    dedupe_seconds,
)

# A decision must not hang on a dead Redis: fail fast into Unavailable.
_SOCKET_TIMEOUT = 2.0
# Connections per Redis node; pipelining-free Lua calls take ~0.1 ms, so 64 in flight keep a
# 2-core budgetd saturated.
_MAX_CONNECTIONS = 64
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# Scripts that release holds get the shared helpers prepended; init needs none of them.
_SCRIPTS = {"reserve": True, "settle": True, "release": True, "init": False}
# What an outage looks like from redis-py; anything else (a script error) is a bug and
# propagates as is.
_OUTAGES: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # also BusyLoadingError, MaxConnectionsError
    redis.exceptions.TimeoutError,
    redis.exceptions.ClusterError,  # also ClusterDownError, MasterDownError
    redis.exceptions.ReadOnlyError,  # a primary demoted by a failover
    OSError,  # also the builtin TimeoutError
)


@contextmanager
def _unavailable() -> Iterator[None]:
    """The one place Redis outages become :class:`~server.errors.Unavailable`."""
    try:
        yield
    except _OUTAGES as exc:
        detail = str(exc) or type(exc).__name__
        raise Unavailable(f"redis unavailable: {detail}") from exc


def _script_source(name: str, with_helpers: bool) -> str:
    lua = files("server.storage") / "lua"
    body = (lua / f"{name}.lua").read_text(encoding="utf-8")
    if not with_helpers:
        return body
    helpers = (lua / "common.lua").read_text(encoding="utf-8")
    return f"local PURGE_LIMIT = {PURGE_LIMIT}\n{helpers}\n{body}"


def _split_url(url: str, cluster: bool | None) -> tuple[str, bool]:
    """The URL redis-py understands, and whether it names a cluster."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in _CLUSTER_SCHEMES:
        return f"{_CLUSTER_SCHEMES[scheme]}://{rest}", cluster is not False
    return url, bool(cluster)


def _seconds(value: float) -> str:
    """An instant as Redis parses it for zset scores (``repr`` round-trips the double)."""
    if not math.isfinite(value):
        raise ValueError(f"instants must be finite, got {value!r}")
    return repr(float(value))


def _limit(limit: int | None) -> str:
    return "-1" if limit is None else str(limit)


def _state(spend: str | None, held: str | None) -> CounterState | None:
    if spend is None or held is None:
        return None
    return CounterState(int(spend), int(held))


def _states(flat: Sequence[str | None]) -> tuple[CounterState | None, ...]:
    return tuple(_state(flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def _present(flat: Sequence[str | None]) -> tuple[CounterState, ...]:
    states = _states(flat)
    present = tuple(state for state in states if state is not None)
    if len(present) != len(states):
        raise RuntimeError("reserve.lua returned a missing counter in a decision")
    return present


class _TeamKeys:
    """The keys of one team, all under the team's hash tag."""

    __slots__ = ("base",)

    def __init__(self, prefix: str, team_id: str) -> None:
        self.base = f"{prefix}:{{t:{quote(team_id, safe='')}}}"

    @property
    def holds(self) -> str:
        return f"{self.base}:holds"

    @property
    def hold_expiry(self) -> str:
        return f"{self.base}:holdexp"

    def counter(self, scope: ScopeBudget) -> str:
        return f"{self.base}:c:{scope.counter_id}"

    def done(self, request_id: str) -> str:
        return f"{self.base}:done:{request_id}"


class RedisCounters:
    """A :class:`~server.storage.base.CounterStore` in Redis or Redis Cluster.

    ``url`` is ``redis://``, ``rediss://``, or ``redis+cluster://`` / ``rediss+cluster://``
    for a cluster (also chosen with ``cluster=True``). ``prefix`` starts every key.
    """

    def __init__(self, url: str, *, prefix: str = "bd", cluster: bool | None = None) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be non-empty and free of braces, got {prefix!r}")
        self._url, self._cluster = _split_url(url, cluster)
        self._prefix = prefix
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}

    async def start(self) -> None:
        """Connect and register the scripts; raises Unavailable when Redis cannot be reached.

        The client is kept even then, so a caller that carries on without Redis gets it
        back (reconnected by redis-py) once Redis returns.
        """
        client: Redis | RedisCluster
        # Every script is safe to run twice (reserve replaces its own hold, settle dedupes
        # on request_id, init only fills what is absent), so a command that met a dropped
        # pooled connection (Redis restarted) is retried once on a fresh one.
        options: dict[str, Any] = {
            "decode_responses": True,
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_connect_timeout": _SOCKET_TIMEOUT,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.01), 1),
            "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        }
        if self._cluster:
            client = RedisCluster.from_url(self._url, max_connections=_MAX_CONNECTIONS, **options)
        else:
            # A bounded pool that waits for a free connection: a burst of decisions queues
            # briefly instead of opening thousands of connections (Redis refuses past
            # maxclients, and each connection costs both sides).
            pool = BlockingConnectionPool.from_url(
                self._url, max_connections=_MAX_CONNECTIONS, timeout=_SOCKET_TIMEOUT, **options
            )
            client = Redis.from_pool(pool)
        self._client = client
        # register_script only computes the SHA: the first EVALSHA that meets NOSCRIPT (a new
        # server, SCRIPT FLUSH, a restart) loads the script and retries.
        self._scripts = {
            name: client.register_script(_script_source(name, helpers))
            for name, helpers in _SCRIPTS.items()
        }
        with _unavailable():
            if isinstance(client, RedisCluster):
                await client.initialize()
            else:
                await client.ping()

    async def close(self) -> None:
        """Close the connections."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def reserve(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        amount: int,
        reservation_id: str,
        hold_expires_at: float,
        now: float,
        mode: Enforcement,
    ) -> ReserveResult:
        """Check every scope with the rule and, only if all admit, hold ``amount`` on each.

        Expired holds are released first; an earlier hold under the same ``reservation_id``
        is replaced, not added to. With ``amount`` 0 nothing is held.
        """
        check_nanos("amount", amount)
        check_scopes(scopes)
        if amount > 0 and not reservation_id:
            raise ValueError("a hold needs a reservation_id")
        keys = _TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "reserve",
            [keys.holds, keys.hold_expiry, *(keys.counter(scope) for scope in scopes)],
            [
                _seconds(now),
                Enforcement(mode).value,
                str(amount),
                reservation_id,
                _seconds(hold_expires_at),
                *(_limit(scope.limit_nanos) for scope in scopes),
            ],
        )
        status = ReserveStatus(reply[0])
        if status is ReserveStatus.MISSING:
            return ReserveResult(status, missing=tuple(int(i) for i in reply[1]))
        if status is ReserveStatus.DENIED:
            return ReserveResult(status, states=_present(reply[2]), denied_index=int(reply[1]))
        return ReserveResult(status, states=_present(reply[1]))

    async def init(
        self, team_id: str, counters: Sequence[tuple[ScopeBudget, int]], now: float
    ) -> None:
        """Create missing counters with the given ledger spend; existing ones are left alone."""
        if not counters:
            return
        keys = _TeamKeys(self._prefix, team_id)
        args: list[str] = []
        for scope, spend in counters:
            check_nanos("spend", spend)
            ttl = counter_ttl(scope.window, now)
            args += [str(spend), "0" if ttl is None else str(ttl)]
        await self._run("init", [keys.counter(scope) for scope, _ in counters], args)

    async def settle(
        self,
        team_id: str,
        reservation_id: str,
        scopes: Sequence[ScopeBudget],
        cost: int,
        request_id: str,
        now: float,
        dedupe_ttl: float,
    ) -> SettleResult:
        """Release the reservation's hold (if any) and add ``cost`` to each existing counter.

        Applied once per ``request_id`` within ``dedupe_ttl`` seconds; a repeat changes
        nothing and returns ``applied=False`` with the current counters.
        """
        check_nanos("cost", cost)
        if not request_id:
            raise ValueError("settle needs a request_id")
        keys = _TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "settle",
            [
                keys.holds,
                keys.hold_expiry,
                keys.done(request_id),
                *(keys.counter(scope) for scope in scopes),
            ],
            [_seconds(now), reservation_id, str(cost), str(dedupe_seconds(dedupe_ttl))],
        )
        return SettleResult(bool(int(reply[0])), _states(reply[1]))

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters, None where missing.

        Holds that expired since the team's last reserve, settle or release still count in
        ``held`` here: reading does not write.
        """
        if not scopes:
            return ()
        keys = _TeamKeys(self._prefix, team_id)
        client = self._require_client()
        with _unavailable():
            # One round trip; every key shares the team's slot, so a cluster pipeline too
            # goes to a single node.
            pipe = client.pipeline(transaction=False)
            for scope in scopes:
                pipe.hmget(keys.counter(scope), ["spend", "held"])
            rows: list[list[str | None]] = await pipe.execute()
        return tuple(_state(spend, held) for spend, held in rows)

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold without spending; False when there was none (or it had expired)."""
        keys = _TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "release", [keys.holds, keys.hold_expiry], [_seconds(now), reservation_id]
        )
        return bool(int(reply))

    def _require_client(self) -> Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisCounters used before start() or after close()")
        return self._client

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA a script (reloading it on NOSCRIPT), translating outages."""
        client = self._require_client()
        with _unavailable():
            return await self._scripts[name](keys=keys, args=args, client=client)
