"""A record store wrapper that caches keys and teams, and rides out a record-store outage.

Every decision reads its key and team (and, with a user, the team membership).
:class:`CachedRecords` keeps the answers of ``get_key_by_hash``, ``get_key``, ``get_team``
and ``get_member`` in a bounded LRU cache in this process:

* an entry younger than ``ttl`` seconds (``budgetd.record_cache_ttl``, default 5 s) is served
  without asking Postgres. So a change made through *another* replica (a revoked key, a new
  budget, a blocked team, a removed member) reaches this one within ``ttl`` seconds; a
  change made through this replica applies here at once, since writes go through and
  refresh their entries;
* an older entry is refreshed from the store, and served as it is (whatever its age) only
  when the store is down (:class:`~server.errors.RecordsUnavailable`) and ``serve_stale``
  is set (``budgetd.postgres_down: spool``), so known keys keep being decided from Redis
  while Postgres is down. A key or team never seen by this process cannot be resolved then:
  the call fails with UNAVAILABLE, never with an allow.

``create_team_if_absent`` (the JWT team upsert, on every JWT request) answers from a fresh
cached team without writing, since teams are never deleted; otherwise it goes to the store
and caches the team it returns (when the store is down, a cached team is served under the
same rule as above).

Everything else (the ledger, sums, listings, writes) goes straight to the wrapped store.
Entries are also evicted least-recently-used beyond ``capacity``. A read that started
before a write to the same entry never overwrites what the write stored.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from server.errors import RecordsUnavailable
from server.storage.base import (
    KeyRecord,
    LedgerEntry,
    LedgerInsert,
    MemberRecord,
    RecordStore,
    ScopeKind,
    SpendQuery,
    SpendRow,
    SpendSum,
    TeamRecord,
)

log = logging.getLogger("budgetd.records")

DEFAULT_CAPACITY: Final = 100_000

_TEAM: Final = "team"
_KEY: Final = "key"
_HASH: Final = "hash"
_MEMBER: Final = "member"
Slot = tuple[str, ...]  # (kind, id) or (member, team_id, user_id)
Cached = KeyRecord | TeamRecord | MemberRecord


@dataclass(frozen=True, slots=True)
class Freshness:
    """Until when some cached entries stay fresh: ``until`` on the cache's clock, and only
    while no write has gone through this cache since (``writes``)."""

    until: float
    writes: int


@dataclass(frozen=True, slots=True)
class _Entry:
    value: Cached | None
    fetched_at: float
    version: int  # the write sequence number when the read began (or of the write)


class CachedRecords:
    """A :class:`~server.storage.base.RecordStore` with cached key and team reads."""

    def __init__(
        self,
        inner: RecordStore,
        *,
        ttl: float,
        serve_stale: bool,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or capacity < 1:
            raise ValueError("ttl must be >= 0 and capacity >= 1")
        self.inner = inner
        self._ttl = ttl
        self._serve_stale = serve_stale
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[Slot, _Entry] = OrderedDict()
        self._writes = 0
        self._stale = False  # serving stale entries right now (logged once per outage)

    # -- cached reads ------------------------------------------------------------------------

    async def get_team(self, team_id: str) -> TeamRecord | None:
        found = await self._read((_TEAM, team_id), lambda: self.inner.get_team(team_id))
        assert found is None or isinstance(found, TeamRecord)
        return found

    async def get_key(self, key_id: str) -> KeyRecord | None:
        found = await self._read((_KEY, key_id), lambda: self.inner.get_key(key_id))
        assert found is None or isinstance(found, KeyRecord)
        return found

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        found = await self._read((_HASH, key_hash), lambda: self.inner.get_key_by_hash(key_hash))
        assert found is None or isinstance(found, KeyRecord)
        return found

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None:
        found = await self._read(
            (_MEMBER, team_id, user_id), lambda: self.inner.get_member(team_id, user_id)
        )
        assert found is None or isinstance(found, MemberRecord)
        return found

    @property
    def writes(self) -> int:
        """How many writes went through this cache (read it before resolving records whose
        :meth:`freshness` you will ask for: a write in between makes them suspect)."""
        return self._writes

    def freshness(self, key_hash: str, team_id: str, user_id: str = "") -> Freshness | None:
        """How long the cached key (by hash), its team and, with ``user_id``, the membership
        read by the last decision stay fresh; None when one of them is not cached.

        Callers that derive something from these records (:mod:`server.hot`) may use it
        while :meth:`still_fresh` says so: exactly as long as the reads would be answered
        from this cache without asking the store.
        """
        slots: list[Slot] = [(_HASH, key_hash), (_TEAM, team_id)]
        if user_id:
            slots.append((_MEMBER, team_id, user_id))
        oldest = float("inf")
        for slot in slots:
            entry = self._entries.get(slot)
            if entry is None:
                return None
            oldest = min(oldest, entry.fetched_at)
        return Freshness(oldest + self._ttl, self._writes)

    def still_fresh(self, freshness: Freshness) -> bool:
        """True while entries judged by :meth:`freshness` would still be served as cached."""
        return freshness.writes == self._writes and self._clock() < freshness.until

    async def _read(
        self, slot: Slot, fetch: Callable[[], Awaitable[Cached | None]]
    ) -> Cached | None:
        entry = self._entries.get(slot)
        now = self._clock()
        if entry is not None and now - entry.fetched_at < self._ttl:
            self._entries.move_to_end(slot)
            return entry.value
        version = self._writes
        try:
            value = await fetch()
        except RecordsUnavailable:
            entry = self._entries.get(slot)  # a write may have refreshed it meanwhile
            if entry is None or not self._serve_stale:
                raise
            self._serving_stale()
            return entry.value
        self._fresh_again()
        self._store(slot, value, now, version)
        if isinstance(value, KeyRecord):  # one read fills both ways of finding the key
            other = (_KEY, value.key_id) if slot[0] == _HASH else (_HASH, value.key_hash)
            self._store(other, value, now, version)
        return value

    def _serving_stale(self) -> None:
        if not self._stale:
            self._stale = True
            log.warning("the record store is down: deciding from cached keys and teams")

    def _fresh_again(self) -> None:
        if self._stale:
            self._stale = False
            log.warning("the record store is back: cached keys and teams are refreshed again")

    # -- writes: through to the store, then refresh this process's entries -----------------

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        slot = (_TEAM, team.team_id)
        entry = self._entries.get(slot)
        now = self._clock()
        # Teams are never deleted: a team known to exist needs no write to be "upserted".
        if entry is not None and entry.value is not None and now - entry.fetched_at < self._ttl:
            self._entries.move_to_end(slot)
            assert isinstance(entry.value, TeamRecord)
            return entry.value, False
        version = self._writes
        try:
            stored, created = await self.inner.create_team_if_absent(team)
        except RecordsUnavailable:
            entry = self._entries.get(slot)  # a write may have refreshed it meanwhile
            if entry is None or entry.value is None or not self._serve_stale:
                raise
            self._serving_stale()
            assert isinstance(entry.value, TeamRecord)
            return entry.value, False
        self._fresh_again()
        # Stored like a read: a local write to the team that finished meanwhile is newer.
        self._store(slot, stored, now, version)
        return stored, created

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        stored = await self.inner.create_team(team)
        self._written((_TEAM, stored.team_id), stored)
        return stored

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        stored = await self.inner.update_team(team)
        self._written((_TEAM, stored.team_id), stored)
        return stored

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        stored = await self.inner.insert_key(key)
        self._written_key(stored)
        return stored

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        revoked = await self.inner.revoke_key(key_id, at)
        if revoked is None:
            self._written((_KEY, key_id), None)
        else:
            self._written_key(revoked)
        return revoked

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        stored = await self.inner.update_key(key)
        self._written_key(stored)
        return stored

    async def upsert_member(self, member: MemberRecord) -> MemberRecord:
        stored = await self.inner.upsert_member(member)
        self._written((_MEMBER, stored.team_id, stored.user_id), stored)
        return stored

    async def delete_member(self, team_id: str, user_id: str) -> bool:
        deleted = await self.inner.delete_member(team_id, user_id)
        self._written((_MEMBER, team_id, user_id), None)
        return deleted

    def _written_key(self, key: KeyRecord) -> None:
        self._written((_KEY, key.key_id), key)
        self._written((_HASH, key.key_hash), key)

    def _written(self, slot: Slot, value: Cached | None) -> None:
        self._writes += 1
        self._store(slot, value, self._clock(), self._writes)

    def _store(self, slot: Slot, value: Cached | None, at: float, version: int) -> None:
        current = self._entries.get(slot)
        if current is not None and current.version > version:
            return  # written after this read began: the write is newer
        self._entries[slot] = _Entry(value, at, version)
        self._entries.move_to_end(slot)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    # -- everything else goes straight through -------------------------------------------

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def instance_secret(self) -> bytes:
        return await self.inner.instance_secret()

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        return await self.inner.list_teams(after_team_id, limit)

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        return await self.inner.insert_spend(entry)

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        return await self.inner.get_spend(request_id)

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        return await self.inner.list_members(team_id)

    async def sum_spend(
        self,
        kind: ScopeKind,
        scope_id: str,
        start: float,
        end: float | None,
        *,
        user_id: str = "",
        model: str = "",
    ) -> int:
        return await self.inner.sum_spend(kind, scope_id, start, end, user_id=user_id, model=model)

    async def sum_spend_as_of(
        self,
        kind: ScopeKind,
        scope_id: str,
        start: float,
        end: float | None,
        *,
        user_id: str = "",
        model: str = "",
    ) -> SpendSum:
        return await self.inner.sum_spend_as_of(
            kind, scope_id, start, end, user_id=user_id, model=model
        )

    async def list_keys(
        self, team_id: str, after_key_id: str, limit: int, *, include_revoked: bool = False
    ) -> list[KeyRecord]:
        return await self.inner.list_keys(
            team_id, after_key_id, limit, include_revoked=include_revoked
        )

    async def spend_report(self, query: SpendQuery) -> list[SpendRow]:
        return await self.inner.spend_report(query)
