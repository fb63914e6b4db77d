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

Exactly once, even when counters vanish under load: a request writes its ledger row, then
settles its cost into the counters. A counter rebuilt in between (by another request, after
a FLUSHALL) may or may not have summed that row. So a rebuilt counter remembers the ledger
snapshot it summed in, each settle names the transaction that wrote its row, and the counter
adds the cost only if its snapshot did not see that transaction; a settle that finds the
counter missing parks the cost, and the ``init`` that recreates the counter adds what its
snapshot did not see. Stores without snapshots (SQLite + in-process counters, one process)
pass None and get the plain behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol
from urllib.parse import quote

from server.rules import Enforcement
from server.windows import Window


@dataclass(frozen=True, slots=True)
class ModelBudget:
    """A budget for one model within a key or team (LiteLLM's ``model_max_budget`` entry)."""

    limit_nanos: int
    duration: str = ""  # "" = never resets


def _no_model_budgets() -> Mapping[str, ModelBudget]:
    return {}


@dataclass(frozen=True, slots=True)
class TeamRecord:
    """A team as stored. ``max_budget_nanos`` None means unlimited.

    ``member_*`` are the defaults of every member of the team (LiteLLM's
    ``team_member_budget``, ``team_member_rpm_limit``, ``team_member_tpm_limit``); a
    :class:`MemberRecord` may override them for one member.
    """

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
    soft_budget_nanos: int | None = None
    member_budget_nanos: int | None = None
    member_budget_duration: str = ""
    member_rpm_limit: int | None = None
    member_tpm_limit: int | None = None
    model_max_budget: Mapping[str, ModelBudget] = field(default_factory=_no_model_budgets)


@dataclass(frozen=True, slots=True)
class MemberRecord:
    """One user's membership of a team; a None field falls back to the team's default."""

    team_id: str
    user_id: str
    max_budget_nanos: int | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
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
    blocked: bool = False
    soft_budget_nanos: int | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    model_max_budget: Mapping[str, ModelBudget] = field(default_factory=_no_model_budgets)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One settled request in the append-only ledger; ``request_id`` is unique."""

    request_id: str
    team_id: str
    key_id: str  # "" for a request authenticated by a JWT
    cost_nanos: int
    admitted_at: float  # the instant the request was admitted: picks its windows
    recorded_at: float
    reservation_id: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    user_id: str = ""  # the team member who spent ("" = none)


@dataclass(frozen=True, slots=True)
class LedgerInsert:
    """Result of inserting into the ledger: the stored entry, and whether it was new.

    ``xact`` identifies the database transaction that wrote the stored row (Postgres: its
    64-bit transaction id), so a counter rebuilt from a ledger snapshot can tell whether
    the row was already in its sum (see :class:`SpendSum`); None when the store keeps none.
    """

    inserted: bool
    entry: LedgerEntry
    xact: int | None = None


@dataclass(frozen=True, slots=True)
class SpendSum:
    """An exact ledger sum and the snapshot it was read in.

    ``snapshot`` is Postgres' ``pg_current_snapshot()`` text (``xmin:xmax:xip,...``) of the
    statement that summed: exactly the rows whose ``xact`` is visible in it are in ``total``.
    None when the store has no snapshots (SQLite, single process).
    """

    total: int
    snapshot: str | None = None


class ScopeKind(StrEnum):
    TEAM = "team"
    KEY = "key"
    MEMBER = "member"  # a user within a team: scope_id is the team's id, user_id the user


@dataclass(frozen=True, slots=True)
class ScopeBudget:
    """One budget a decision checks, in the window of the decision.

    Whose spend it counts, in ledger terms: rows of key ``scope_id`` (KEY) or of team
    ``scope_id`` (TEAM, MEMBER); for MEMBER only the rows of ``user_id``; with ``model``
    only the rows of that model (a ``model_max_budget`` entry).
    """

    kind: ScopeKind
    scope_id: str
    limit_nanos: int | None
    duration: str  # "" = never resets
    window: Window
    user_id: str = ""
    model: str = ""

    @property
    def counter_id(self) -> str:
        """The counter's identity: scope, duration and window start (a reset is a new id)."""
        who = self.scope_id
        if self.user_id:
            who += f"/u={quote(self.user_id, safe='')}"
        if self.model:
            who += f"/m={quote(self.model, safe='')}"
        return f"{self.kind.value}:{who}:{self.duration or 'all'}:{self.window.start}"


class RateUnit(StrEnum):
    """What a rate limit counts per minute."""

    REQUESTS = "rpm"
    TOKENS = "tpm"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One per-minute limit of a key, a team or a team member (``user_id`` set)."""

    kind: ScopeKind
    scope_id: str
    unit: RateUnit
    per_minute: int
    user_id: str = ""

    @property
    def limiter_id(self) -> str:
        """The limiter's identity (not windowed: its state drains continuously)."""
        who = self.scope_id
        if self.user_id:
            who += f"/u={quote(self.user_id, safe='')}"
        return f"{self.kind.value}:{who}:{self.unit.value}"


@dataclass(frozen=True, slots=True)
class RateCharge:
    """A rate limit and how much one request takes from it.

    At reserve: 1 for REQUESTS, the estimated tokens for TOKENS. At settle: the correction,
    actual tokens minus the estimate (may be negative), for TOKENS limits only.
    """

    limit: RateLimit
    amount: int


@dataclass(frozen=True, slots=True)
class RateState:
    """A rate limit after a decision: what is left this minute and when it is all back."""

    per_minute: int
    remaining: int
    reset_after: float  # seconds until the limiter is fully drained


@dataclass(frozen=True, slots=True)
class CounterState:
    """Settled spend and outstanding holds of one counter, in nano-USD."""

    spend: int
    held: int


class ReserveStatus(StrEnum):
    RESERVED = "reserved"
    DENIED = "denied"
    RATE_LIMITED = "rate_limited"
    MISSING = "missing"  # some counters must be rebuilt from the ledger first


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """What a reservation attempt found.

    RESERVED: ``states`` are every scope's counters after the hold was placed, ``rates``
    every rate limit's state after it was charged.
    DENIED: ``denied_index`` names the first scope that refused; ``states`` as read.
    RATE_LIMITED: every budget admitted, ``rate_index`` names the first rate limit that
    refused and ``retry_after`` when it would admit; ``states`` and ``rates`` as read.
    MISSING: ``missing`` lists the scopes whose counters need ``init``; nothing was held.
    Budgets are checked before rate limits, and nothing is held or charged unless all admit.
    """

    status: ReserveStatus
    states: tuple[CounterState, ...] = ()
    denied_index: int = -1
    missing: tuple[int, ...] = ()
    rates: tuple[RateState, ...] = ()
    rate_index: int = -1
    retry_after: float = 0.0
    # Request ids announced by begin_settle and never settled (their budgetd died?): the
    # caller settles them from the ledger, or abandons them (see CounterStore.begin_settle).
    unsettled: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SettleResult:
    """What settling did: ``applied`` False when this request_id was settled already.

    ``states`` holds each scope's counters afterwards, None where the counter was missing
    (its spend is in the ledger and returns when the counter is rebuilt).
    """

    applied: bool
    states: tuple[CounterState | None, ...]
    unsettled: tuple[str, ...] = ()  # as in ReserveResult


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

    async def create_team_if_absent(self, team: TeamRecord) -> tuple[TeamRecord, bool]:
        """Insert a team unless its team_id exists: the stored team, and whether it is new.

        Concurrent callers on any number of replicas create exactly one team (JWT upsert).
        """

    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replace a key's mutable fields (blocked, budgets, limits, models, expiry, alias).

        The hash, team and revocation are never changed here; raises NotFound.
        """

    async def upsert_member(self, member: MemberRecord) -> MemberRecord:
        """Insert or replace a team membership; raises NotFound when the team does not exist."""

    async def get_member(self, team_id: str, user_id: str) -> MemberRecord | None: ...

    async def list_members(self, team_id: str) -> list[MemberRecord]:
        """A team's memberships ordered by user_id."""

    async def delete_member(self, team_id: str, user_id: str) -> bool:
        """Remove a membership; False when there was none."""

    async def insert_key(self, key: KeyRecord) -> KeyRecord:
        """Insert a key; raises NotFound when its team does not exist."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def revoke_key(self, key_id: str, at: float) -> KeyRecord | None:
        """Mark a key revoked (idempotent: an earlier revocation time is kept)."""

    async def insert_spend(self, entry: LedgerEntry) -> LedgerInsert:
        """Insert a ledger row unless its request_id exists; return the stored row."""

    async def get_spend(self, request_id: str) -> LedgerInsert | None:
        """The ledger row of ``request_id`` (``inserted`` False), or None."""

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
        """Exact sum of ledger costs of a scope admitted in ``[start, end)`` (end None: open).

        ``scope_id`` is a key id (KEY) or a team id (TEAM, MEMBER); a non-empty ``user_id``
        or ``model`` keeps only that user's or that model's rows (see :class:`ScopeBudget`).
        """

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
        """:meth:`sum_spend`, with the snapshot it was read in (to rebuild a counter)."""

    # -- listings and reports (issue 6: metrics, spend reports, the admin page) ------------

    async def list_keys(
        self, team_id: str, after_key_id: str, limit: int, *, include_revoked: bool = False
    ) -> list[KeyRecord]:
        """Keys ordered by key_id, strictly after ``after_key_id``; ``team_id`` "" = all teams."""

    async def spend_report(self, query: SpendQuery) -> list[SpendRow]:
        """Ledger spend admitted in ``[query.start, query.end)``, summed exactly per group.

        One row per distinct combination of ``query.group_by`` (a single total row when it is
        empty), ordered by day, team_id, key_id, model; at most ``query.limit`` rows.
        """


class SpendGroup(StrEnum):
    """A dimension a spend report is grouped by."""

    TEAM = "team"
    KEY = "key"
    MODEL = "model"
    DAY = "day"  # the calendar day of admitted_at in the query's time zone


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """A spend report: which ledger rows (by admitted_at and filters) and how to group them."""

    start: float
    end: float
    group_by: tuple[SpendGroup, ...] = ()
    team_id: str = ""  # "" = every team
    key_id: str = ""  # "" = every key
    model: str = ""  # "" = every model
    timezone: str = "UTC"  # IANA name: what a "day" is
    limit: int = 1000


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One group of a spend report; dimensions that were not grouped by are ""."""

    spend_nanos: int
    requests: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    day: str = ""  # YYYY-MM-DD
    team_id: str = ""
    team_alias: str = ""
    key_id: str = ""
    key_alias: str = ""
    key_hash: str = ""
    model: str = ""


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
        *,
        rates: Sequence[RateCharge] = (),
    ) -> ReserveResult:
        """Check every scope with the rule and, only if all admit, hold ``amount`` on each.

        Then, in the same atomic step, every rate limit in ``rates`` (see
        :mod:`server.ratelimit` for the rule); only if all admit is each charged and the
        hold placed. Expired holds are released first. With ``amount`` 0 nothing is held.
        """

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

        ``snapshots[i]`` is the ledger snapshot counter ``i``'s spend was summed in (none
        given: no snapshot). A counter created here also takes in the costs that settles
        parked while it was missing, those whose rows its snapshot did not see.

        With ``epoch`` (read by :meth:`team_epoch` before the sums), nothing is created and
        False is returned if the team's counters were invalidated since: the sums may miss
        spend that was never settled into the counters, so they must be read again.
        """

    async def team_epoch(self, team_id: str) -> str:
        """A token that changes whenever the team's counters are invalidated under traffic.

        (A replica that decided on Postgres while Redis was down forgets the counters it did
        not update, see :mod:`server.storage.failover_counters`.) Read it before summing the
        ledger for a rebuild and pass it to :meth:`init`.
        """

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
        """Release the reservation's hold (if any) and add ``cost`` to each existing counter.

        Applied once per ``request_id`` within ``dedupe_ttl`` seconds. ``xact`` is the ledger
        transaction that wrote this spend: a counter whose snapshot already sees it is not
        added to (its ledger sum has the cost), and for a missing counter the cost is parked
        for the ``init`` that recreates it. With ``xact`` None the cost is added to every
        existing counter and missing ones are skipped.

        A store whose spend *is* the ledger (PostgresCounters) adds nothing here: settling
        only releases the hold, the caller's ledger row is the spend.

        ``rates`` are token corrections (actual minus estimated tokens), applied with the
        settle, once per ``request_id`` like the cost.

        ``release_amount`` releases only that much of the reservation's hold, keeping the
        rest (a lease, see :mod:`server.storage.leasing`: the part one settled request had
        taken); the hold goes when nothing is left of it.
        """

    async def read(
        self, team_id: str, scopes: Sequence[ScopeBudget], now: float
    ) -> tuple[CounterState | None, ...]:
        """Current counters, None where missing."""

    async def begin_settle(
        self,
        team_id: str,
        scopes: Sequence[ScopeBudget],
        request_id: str,
        now: float,
        grace: float,
    ) -> tuple[CounterState | None, ...]:
        """``read``, and announce that ``request_id`` is about to be written and settled.

        Between its ledger commit and its settle a request's cost is in the ledger and not
        yet in the counters; a crash there would leave them short for good. So the request
        is journaled here and ``settle`` clears it. One not settled within ``grace`` seconds
        is handed (once per ``RECOVERY_CLAIM_SECONDS``) to the team's next ``reserve`` or
        ``settle`` caller in ``unsettled``, who settles it from its ledger row (the dedupe
        marker makes that harmless if it was only slow) or, with no row, abandons it.
        """

    async def abandon_settle(self, team_id: str, request_id: str, now: float) -> None:
        """Forget an announced request that never reached the ledger."""

    async def release(self, team_id: str, reservation_id: str, now: float) -> bool:
        """Drop a hold without spending; False when there was none."""
