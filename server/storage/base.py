"""The storage seam: what the authority needs from a backend, and the records it trades in.

Storage is split in two halves that every backend pairs up:

* a :class:`RecordStore` — the source of truth: teams, keys (hashed) and the append-only
  spend ledger (SQLite for the embedded default, Postgres otherwise);
* a :class:`CounterStore` — hot per-window spend and holds, decided atomically in one step
  (in-process for the embedded default, one Lua script per decision in Redis).

Counters are a cache of the ledger: a counter that is missing (new window, Redis restarted
or flushed) is reported as such, and the caller rebuilds it from the ledger by *setting* it
(``init``), never by adding to it. All amounts are integer nano-USD; all instants are Unix
seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from server.rules import Enforcement
from server.windows import Window


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """A team as stored. ``max_budget_nanos`` None means unlimited."""

    team_id: str
    team_alias: str
    max_budget_nanos: int | None
    budget_duration: str  # "" = never resets
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    models: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    blocked: bool = False
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An API key as stored: only the SHA-256 hex of the plaintext, never the plaintext."""

    key_id: str
    key_hash: str
    team_id: str
    key_alias: str
    max_budget_nanos: int | None
    budget_duration: str  # "" = never resets
    key_prefix: str = ""
    expires_at: float | None = None
    models: tuple[str, ...] = ()
    user_id: str = ""
    revoked_at: float | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One settled request in the append-only ledger; ``request_id`` is unique."""

    request_id: str
    team_id: str
    key_id: str
    cost_nanos: int
    admitted_at: float  # the instant the request was admitted: picks its windows
    recorded_at: float
    reservation_id: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LedgerInsert:
    """Result of inserting into the ledger: the stored entry, and whether it was new."""

    inserted: bool
    entry: LedgerEntry


class ScopeKind(StrEnum):
    TEAM = "team"
    KEY = "key"


@dataclass(frozen=True, slots=True)
class ScopeBudget:
    """One budget a decision checks: a team's or a key's, in the window of the decision."""

    kind: ScopeKind
    scope_id: str
    limit_nanos: int | None
    duration: str  # "" = never resets
    window: Window

    @property
    def counter_id(self) -> str:
        """The counter's identity: scope, duration and window start (a reset is a new id)."""
        return f"{self.kind.value}:{self.scope_id}:{self.duration or 'all'}:{self.window.start}"


@dataclass(frozen=True, slots=True)
class CounterState:
    """Settled spend and outstanding holds of one counter, in nano-USD."""

    spend: int
    held: int


class ReserveStatus(StrEnum):
    RESERVED = "reserved"
    DENIED = "denied"
    MISSING = "missing"  # some counters must be rebuilt from the ledger first


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What a reservation attempt found.

    RESERVED: ``states`` are every scope's counters after the hold was placed.
    DENIED: ``denied_index`` names the first scope that refused; ``states`` as read.
    MISSING: ``missing`` lists the scopes whose counters need ``init``; nothing was held.
    """

    status: ReserveStatus
    states: tuple[CounterState, ...] = ()
    denied_index: int = -1
    missing: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SettleResult:
    """What settling did: ``applied`` False when this request_id was settled already.

    ``states`` holds each scope's counters afterwards, None where the counter was missing
    (its spend is in the ledger and returns when the counter is rebuilt).
    """

    applied: bool
    states: tuple[CounterState | None, ...]


class RecordStore(Protocol):
    """The source of truth: teams, keys and the spend ledger."""

    async def start(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None: ...

    async def instance_secret(self) -> bytes:
        """A random secret created once per database, shared by every replica."""

    async def create_team(self, team: TeamRecord) -> TeamRecord:
        """Insert a team; raises AlreadyExists when the team_id is taken."""

    async def get_team(self, team_id: str) -> TeamRecord | None: ...

    async def list_teams(self, after_team_id: str, limit: int) -> list[TeamRecord]:
        """Teams ordered by team_id, strictly after ``after_team_id``."""

    async def update_team(self, team: TeamRecord) -> TeamRecord:
        """Replace a team's row; raises NotFound when it does not exist."""

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        """Insert a key; raises NotFound when its team does not exist."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark a key revoked (idempotent: an earlier revocation time is kept)."""

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        """Insert a ledger row unless its request_id exists; return the stored row."""

    async def sum_spend(
        self, kind: ScopeKind, scope_id: str, start: float, end: float | None
    ) -> int:
        """Exact sum of ledger costs of a scope admitted in ``[start, end)`` (end None: open)."""


class CounterStore(Protocol):
    """Hot counters: per-window spend and holds, each decision one atomic step."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

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

        Expired holds are released first. With ``amount`` 0 nothing is held.
        """

    async def init(
        self, team_id: str, counters: Sequence[tuple[ScopeBudget, int]], now: float
    ) -> None:
        """Create missing counters with the given ledger spend; existing ones are left alone."""

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

        Applied once per ``request_id`` within ``dedupe_ttl`` seconds.
        """

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters, None where missing."""

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold without spending; False when there was none."""
