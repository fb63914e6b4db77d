"""Counters in Redis (or Redis Cluster), shared by every budgetd replica.

Each operation is one EVALSHA of a Lua script in ``server/storage/lua/`` (KEYS and ARGV are
written at the top of each), so a decision is one atomic step however many replicas run.
On a single node, concurrent script calls share pipelines
(:class:`~server.storage.redis_pipeline.ScriptBatcher`); each script stays atomic on its own.
The semantics are those of :mod:`server.storage.memory_counters`, and the same contract
tests run against both.

The keys (one hash tag per team, so the scripts run unchanged on Redis Cluster) are laid out
in :mod:`server.storage.redis_keys`. Time always comes from the caller's ``now``, never from
Redis ``TIME``; only the TTLs of counters, dedupe markers, parked costs and rate limiters run
on Redis's own clock.

Rate limits (rpm, tpm) are checked and charged in the same script as the budgets
(``reserve.lua``, token corrections in ``settle.lua``), with ``lua/ratelimit.lua`` the exact
twin of :mod:`server.ratelimit`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.resources import files
from typing import Any, Final

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server import ratelimit
from server.errors import Unavailable
from server.rules import Enforcement
from server.storage.base import (
    CounterState,
    RateCharge,
    RateState,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    SettleResult,
)
from server.storage.batching import BatchCounts
from server.storage.memory_counters import (
    MAX_PARTIAL_RELEASE,
    PURGE_LIMIT,
    RECOVERY_CLAIM_SECONDS,
    check_nanos,
    check_scopes,
    counter_ttl,
    dedupe_seconds,
)
from server.storage.memory_limiters import check_rates, now_ms
from server.storage.redis_keys import TeamKeys, delete_matching
from server.storage.redis_pipeline import ScriptBatcher

# A decision must not hang on a dead Redis: fail fast into Unavailable.
_SOCKET_TIMEOUT = 2.0
# Connections per Redis node; Lua calls take ~0.1 ms, so 64 in flight keep a 2-core budgetd
# saturated (on a single node, concurrent script calls share a few pipelines besides).
_MAX_CONNECTIONS = 64
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
# An epoch outlives any rebuild in flight by far; then it may go (missing reads as "").
_EPOCH_TTL = 86_400
# Each script, and the helpers prepended to it (in order).
_SCRIPTS: Final[Mapping[str, tuple[str, ...]]] = {
    "reserve": ("common", "ratelimit"),
    "settle": ("common", "ratelimit"),
    "release": ("common",),
    "init": ("common",),
    "begin": ("common",),
    "epoch": (),
}
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


def _script_source(name: str, helpers: Sequence[str]) -> str:
    """A script with its helpers prepended, after the constants they share with Python."""
    lua = files("server.storage") / "lua"
    body = (lua / f"{name}.lua").read_text(encoding="utf-8")
    if not helpers:
        return body
    constants = {
        "PURGE_LIMIT": PURGE_LIMIT,
        "RECOVERY_CLAIM": RECOVERY_CLAIM_SECONDS,
        "WINDOW_MS": ratelimit.WINDOW_MS,
        "MAX_LEVEL": ratelimit.MAX_LEVEL,
    }
    parts = [f"local {constant} = {value}" for constant, value in constants.items()]
    parts += [(lua / f"{helper}.lua").read_text(encoding="utf-8") for helper in helpers]
    return "\n".join([*parts, body])


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


def _rate_states(rates: Sequence[RateCharge], levels: Sequence[int]) -> tuple[RateState, ...]:
    return tuple(
        ratelimit.state(rate.limit.per_minute, int(level))
        for rate, level in zip(rates, levels, strict=True)
    )


def _rate_args(rates: Sequence[RateCharge]) -> list[str]:
    """ARGV of the rate charges: unit, per_minute, amount of each (see reserve.lua)."""
    args: list[str] = []
    for rate in rates:
        args += [rate.limit.unit.value, str(rate.limit.per_minute), str(rate.amount)]
    return args


def _present(flat: Sequence[str | None]) -> tuple[CounterState, ...]:
    states = _states(flat)
    present = tuple(state for state in states if state is not None)
    if len(present) != len(states):
        raise RuntimeError("reserve.lua returned a missing counter in a decision")
    return present


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
        self._batcher: ScriptBatcher | None = None

    @property
    def script_batcher(self) -> ScriptBatcher | None:
        """What batches script calls into pipelines (its counts are for tests and metrics);
        None on a cluster or before :meth:`start`."""
        return self._batcher

    def batch_counts(self) -> BatchCounts | None:
        """The script pipelines' counts (:class:`server.storage.batching.Batching`)."""
        return None if self._batcher is None else self._batcher.counts()

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
            def pool(**overrides: Any) -> BlockingConnectionPool:
                return BlockingConnectionPool.from_url(
                    self._url,
                    max_connections=_MAX_CONNECTIONS,
                    timeout=_SOCKET_TIMEOUT,
                    **{**options, **overrides},
                )

            client = Redis.from_pool(pool())
            # Concurrent script calls go out as shared pipelines on a single node only (a
            # RedisCluster pipeline is split per slot and node, and concurrent calls for
            # different teams hash to different slots, so on a cluster each call keeps its
            # own EVALSHA). The batcher has connections of its own, without a socket
            # timeout: it bounds each round trip itself, with one timer where redis-py
            # would arm one per reply (see server/storage/redis_pipeline.py).
            batch_client = Redis.from_pool(pool(socket_timeout=None))
            self._batcher = ScriptBatcher(batch_client, timeout=_SOCKET_TIMEOUT)
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
        """Close the connections, once the pipelines in flight are done."""
        client, self._client = self._client, None
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await batcher.aclose()
            await batcher.client.aclose()
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
        *,
        rates: Sequence[RateCharge] = (),
    ) -> ReserveResult:
        """Check every scope with the rule, then every rate limit; only if all admit, hold
        ``amount`` on each scope and charge each limit (one script).

        Expired holds are released first; an earlier hold under the same ``reservation_id``
        is replaced, not added to (its rate charges are not: a retried check counts again).
        With ``amount`` 0 nothing is held.
        """
        check_nanos("amount", amount)
        check_scopes(scopes)
        check_rates(rates, at_reserve=True)
        if amount > 0 and not reservation_id:
            raise ValueError("a hold needs a reservation_id")
        keys = TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "reserve",
            [
                keys.holds,
                keys.hold_expiry,
                keys.inflight,
                *(keys.counter(scope) for scope in scopes),
                *(keys.limiter(rate.limit) for rate in rates),
            ],
            [
                _seconds(now),
                Enforcement(mode).value,
                str(amount),
                reservation_id,
                _seconds(hold_expires_at),
                str(now_ms(now)),
                str(len(scopes)),
                *(_limit(scope.limit_nanos) for scope in scopes),
                *_rate_args(rates),
            ],
        )
        status = ReserveStatus(reply[0])
        unsettled = tuple(reply[-1])
        if status is ReserveStatus.MISSING:
            missing = tuple(int(i) for i in reply[1])
            return ReserveResult(status, missing=missing, unsettled=unsettled)
        if status is ReserveStatus.DENIED:
            return ReserveResult(status, _present(reply[2]), int(reply[1]), unsettled=unsettled)
        if status is ReserveStatus.RATE_LIMITED:
            return ReserveResult(
                status,
                _present(reply[2]),
                rates=_rate_states(rates, reply[3]),
                rate_index=int(reply[1]),
                retry_after=int(reply[4]) / 1000,
                unsettled=unsettled,
            )
        return ReserveResult(
            status,
            states=_present(reply[1]),
            rates=_rate_states(rates, reply[2]),
            unsettled=unsettled,
        )

    async def init(
        self,
        team_id: str,
        counters: Sequence[tuple[ScopeBudget, int]],
        now: float,
        *,
        snapshots: Sequence[str | None] = (),
        epoch: str | None = None,
    ) -> bool:
        """Create missing counters with the given ledger spend; existing ones are left alone.

        A new counter remembers the ledger snapshot its spend was summed in, and takes in
        the costs parked while it was missing whose rows that snapshot did not see. False,
        creating nothing, when ``epoch`` is given and the team's epoch changed since.
        """
        if not counters:
            return True
        keys = TeamKeys(self._prefix, team_id)
        names: list[str] = [keys.epoch]
        args: list[str] = ["skip" if epoch is None else "check", epoch or ""]
        for index, (scope, spend) in enumerate(counters):
            check_nanos("spend", spend)
            ttl = counter_ttl(scope.window, now)
            snapshot = snapshots[index] if index < len(snapshots) else None
            names += [keys.counter(scope), keys.parked(scope)]
            args += [str(spend), "0" if ttl is None else str(ttl), snapshot or ""]
        return int(await self._run("init", names, args)) >= 0

    async def team_epoch(self, team_id: str) -> str:
        """The team's epoch token, created if missing.

        Never "" in Redis: a FLUSHALL between this read and the ``init`` deletes the token,
        and that must count as a change (it took the parked costs with it).
        """
        keys = TeamKeys(self._prefix, team_id)
        token = await self._run("epoch", [keys.epoch], [secrets.token_hex(8), str(_EPOCH_TTL)])
        return str(token)

    async def settle(
        self,
        team_id: str,
        reservation_id: str,
        scopes: Sequence[ScopeBudget],
        cost: int,
        request_id: str,
        now: float,
        dedupe_ttl: float,
        *,
        xact: int | None = None,
        rates: Sequence[RateCharge] = (),
        release_amount: int | None = None,
    ) -> SettleResult:
        """Release the reservation's hold (if any; only ``release_amount`` of it when given),
        add ``cost`` to each existing counter and apply the token corrections ``rates`` to
        their limiters (one script).

        Applied once per ``request_id`` within ``dedupe_ttl`` seconds; a repeat changes
        nothing and returns ``applied=False`` with the current counters. A counter whose
        snapshot saw ledger transaction ``xact`` is not added to; for a missing counter the
        cost is parked for the init that recreates it.
        """
        check_nanos("cost", cost)
        check_rates(rates, at_reserve=False)
        if not request_id:
            raise ValueError("settle needs a request_id")
        if xact is not None and xact < 0:
            raise ValueError(f"xact must not be negative, got {xact}")
        if release_amount is not None:
            check_nanos("release_amount", release_amount)
            if release_amount >= MAX_PARTIAL_RELEASE:
                raise ValueError(f"release_amount must be below 2^53, got {release_amount}")
        keys = TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "settle",
            [
                keys.holds,
                keys.hold_expiry,
                keys.done(request_id),
                keys.inflight,
                *(keys.counter(scope) for scope in scopes),
                *(keys.parked(scope) for scope in scopes),
                *(keys.limiter(rate.limit) for rate in rates),
            ],
            [
                _seconds(now),
                reservation_id,
                str(cost),
                str(dedupe_seconds(dedupe_ttl)),
                "" if xact is None else str(xact),
                request_id,
                str(now_ms(now)),
                str(len(scopes)),
                "" if release_amount is None else str(release_amount),
                *_rate_args(rates),
            ],
        )
        return SettleResult(bool(int(reply[0])), _states(reply[1]), tuple(reply[2]))

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        """``read``, and journal ``request_id`` until its settle (one script, one round trip)."""
        if not request_id:
            raise ValueError("begin_settle needs a request_id")
        keys = TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "begin",
            [keys.inflight, *(keys.counter(scope) for scope in scopes)],
            [request_id, _seconds(now + grace)],
        )
        return _states(reply)

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        """Forget an announced request that never reached the ledger."""
        client = self._require_client()
        with _unavailable():
            await client.zrem(TeamKeys(self._prefix, team_id).inflight, request_id)

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters, None where missing.

        Holds that expired since the team's last reserve, settle or release still count in
        ``held`` here: reading does not write.
        """
        if not scopes:
            return ()
        keys = TeamKeys(self._prefix, team_id)
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
        keys = TeamKeys(self._prefix, team_id)
        reply = await self._run(
            "release", [keys.holds, keys.hold_expiry], [_seconds(now), reservation_id]
        )
        return bool(int(reply))

    async def ping(self) -> None:
        """One PING (every primary of a cluster); raises Unavailable when Redis does not answer."""
        client = self._require_client()
        with _unavailable():
            if isinstance(client, RedisCluster):
                await client.ping(target_nodes=RedisCluster.PRIMARIES)
            else:
                await client.ping()

    async def forget_teams(self, team_ids: Iterable[str]) -> int:
        """Delete the counters of these teams; returns how many were deleted.

        For a replica that served these teams without Redis (their spend went to the ledger
        only): their counters are then missing and are rebuilt from the ledger by setting.
        First the epoch is replaced, so a rebuild that summed the ledger before (without
        that spend) creates nothing; counters created after it are right, and deleting them
        too is harmless. Holds, parked costs and dedupe markers stay: they are still true,
        and deleting them apart from the counters they belong to could leave a counter
        holding for a hold that no longer exists. Each team's keys share a hash tag, so on
        a cluster they are on one node: the SCAN runs there.
        """
        client = self._require_client()
        deleted = 0
        with _unavailable():
            for team_id in team_ids:
                keys = TeamKeys(self._prefix, team_id)
                await client.set(keys.epoch, secrets.token_hex(8), ex=_EPOCH_TTL)
                deleted += await delete_matching(client, keys.base, keys.counters)
        return deleted

    def _require_client(self) -> Redis | RedisCluster:
        if self._client is None:
            raise RuntimeError("RedisCounters used before start() or after close()")
        return self._client

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA a script (reloading it on NOSCRIPT), translating outages.

        On a single node the call may share a pipeline with concurrent ones; an outage of
        that pipeline is then raised (as Unavailable) to each of its callers.
        """
        client = self._require_client()
        script = self._scripts[name]
        with _unavailable():
            if self._batcher is not None:
                return await self._batcher.call(script, keys, args)
            return await script(keys=keys, args=args, client=client)
