"""Where RedisCounters keeps what: the Redis key layout, one hash tag per team.

``P`` is the prefix, ``T`` the team id percent-encoded so it cannot break out of its hash tag:

* ``P:{t:T}:c:<counter_id>`` — hash ``{spend, held, snap}``: spend and holds in nano-USD, and
  the ledger snapshot the counter was rebuilt from; expires after its window's end plus a
  grace period (no TTL for all-time counters);
* ``P:{t:T}:holds``   — hash ``reservation_id -> JSON [amount, counter key, ...]``;
* ``P:{t:T}:holdexp`` — zset ``reservation_id -> hold expiry`` (Unix seconds);
* ``P:{t:T}:done:<request_id>`` — settle dedupe marker, expiring after ``dedupe_ttl``;
* ``P:{t:T}:p:<counter_id>`` — set of ``xact:cost`` parked by settles that found the counter
  missing, taken in by the init that recreates it (see ``init.lua``), expiring like markers;
* ``P:{t:T}:inflight`` — zset ``request_id -> deadline`` of RecordSpends between their
  ``begin`` and their settle (see ``begin.lua``);
* ``P:{t:T}:epoch`` — a random token, created by the first rebuild that reads it and
  replaced whenever the team's counters are forgotten: a rebuild that read it before its
  ledger sums creates nothing if it changed (or vanished, with a FLUSHALL) meanwhile;
* ``P:{t:T}:rl:<limiter_id>`` — hash ``{level, at}`` of one rate limit of the team, its key
  or one of its members (see ``lua/ratelimit.lua``), expiring when it has drained. Not a
  cache of the ledger: forgetting the team's counters leaves it alone.

Every key of a team carries the hash tag ``{t:T}``, so all keys one script touches share a
slot, and all of a team's keys live on one node of a cluster.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from server.storage.base import RateLimit, ScopeBudget

SCAN_COUNT: Final = 1000
"""Keys one SCAN step looks at, and one DEL deletes."""


class TeamKeys:
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

    @property
    def inflight(self) -> str:
        return f"{self.base}:inflight"

    @property
    def epoch(self) -> str:
        return f"{self.base}:epoch"

    def counter(self, scope: ScopeBudget) -> str:
        return f"{self.base}:c:{scope.counter_id}"

    def parked(self, scope: ScopeBudget) -> str:
        return f"{self.base}:p:{scope.counter_id}"

    def done(self, request_id: str) -> str:
        return f"{self.base}:done:{request_id}"

    def limiter(self, limit: RateLimit) -> str:
        return f"{self.base}:rl:{limit.limiter_id}"

    @property
    def counters(self) -> str:
        """SCAN pattern of the team's counters."""
        return f"{glob_escape(self.base)}:c:*"


def glob_escape(text: str) -> str:
    """``text`` matched literally in a SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


async def delete_matching(client: Redis | RedisCluster, base: str, pattern: str) -> int:
    """Delete the keys matching ``pattern``, all in the slot of ``base``'s hash tag.

    On a cluster the SCAN runs on the one node that holds that slot.
    """
    options: dict[str, Any] = {"match": pattern, "count": SCAN_COUNT}
    if isinstance(client, RedisCluster):
        options["target_nodes"] = client.get_node_from_key(base)
    names = [name async for name in client.scan_iter(**options)]
    deleted = 0
    for start in range(0, len(names), SCAN_COUNT):
        deleted += int(await client.delete(*names[start : start + SCAN_COUNT]))
    return deleted
