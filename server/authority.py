"""The decision path: may this key spend now (CheckBudget), and what did it spend (RecordSpend).

The logic here never reads the wall clock or the environment: storage, clock and settings are
handed in. The comparison rule lives in ``server.rules``; the atomic check-and-hold across
every scope is the counter store's job (one Lua script in Redis).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import tzinfo
from enum import StrEnum
from typing import Any

from server import validation
from server.clock import Clock
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RecordsUnavailable,
    Unavailable,
)
from server.identity import ReservationCodec, hash_api_key
from server.ledger_sync import read_states, rebuild, start_from_zero
from server.money import budget_exceeded_message, nanos_to_usd
from server.pricing import Price, price_nanos
from server.rules import Enforcement
from server.scopes import request_scopes, tightest
from server.settling import DEDUPE_TTL, MAX_SETTLE_GRACE, Settler
from server.spool import Spool
from server.storage.base import (
    CounterState,
    CounterStore,
    KeyRecord,
    LedgerEntry,
    LedgerInsert,
    RecordStore,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
    ScopeKind,
    TeamRecord,
)

# A retried RecordSpend within DEDUPE_TTL seconds re-applies to the counters only if the
# first attempt did not (the counter store remembers request ids this long). Later retries
# are answered from the ledger alone.
_REBUILD_ATTEMPTS = 3


class Reason(StrEnum):
    """Why a request was denied (names match the proto enum)."""

    NONE = "REASON_UNSPECIFIED"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    KEY_INVALID = "KEY_INVALID"
    KEY_EXPIRED = "KEY_EXPIRED"
    KEY_BLOCKED = "KEY_BLOCKED"
    TEAM_BLOCKED = "TEAM_BLOCKED"
    MODEL_NOT_ALLOWED = "MODEL_NOT_ALLOWED"
    JWT_INVALID = "JWT_INVALID"


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """A CheckBudget question, already off the wire (amounts still USD floats)."""

    api_key: str
    model: str = ""
    estimated_cost: float | None = None
    request_id: str = ""
    user_id: str = ""
    max_tokens: int | None = None
    prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to CheckBudget. A denial is an answer, not an error."""

    allowed: bool
    reason: Reason = Reason.NONE
    message: str = ""
    team_id: str = ""
    key_id: str = ""
    key_alias: str = ""
    scope: ScopeKind | None = None
    spend_nanos: int = 0
    max_budget_nanos: int | None = None
    remaining_nanos: int | None = None
    budget_reset_at: float | None = None
    reservation_id: str = ""
    reserved_nanos: int = 0
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class SpendRequest:
    """A RecordSpend call, already off the wire."""

    request_id: str
    reservation_id: str = ""
    api_key: str = ""
    cost: float | None = None
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SpendResult:
    """What RecordSpend recorded: the request's cost and the spends it leaves behind."""

    cost_nanos: int
    team_spend_nanos: int
    key_spend_nanos: int
    duplicate: bool
    # Whose spend it was (for metrics and logs).
    team_id: str = ""
    key_id: str = ""
    key_alias: str = ""


class Authority:
    """Decides CheckBudget and records RecordSpend against one record and counter store.

    With a ``spool`` (``budgetd.postgres_down: spool``) decisions carry on while the record
    store is down: keys and teams come from the record cache, counters the ledger cannot
    rebuild start from 0 (see :func:`server.ledger_sync.start_from_zero`), and RecordSpend
    spools its ledger row to local disk, fsynced, before it answers. Without one, anything
    that needs the record store is UNAVAILABLE while it is down.
    """

    def __init__(
        self,
        records: RecordStore,
        counters: CounterStore,
        clock: Clock,
        codec: ReservationCodec,
        *,
        enforcement: Enforcement,
        reservation_ttl: float,
        tz: tzinfo,
        prices: Mapping[str, Price],
        spool: Spool | None = None,
    ) -> None:
        self._records = records
        self._counters = counters
        self._clock = clock
        self._codec = codec
        self._enforcement = enforcement
        self._ttl = reservation_ttl
        self._tz = tz
        self._prices = prices
        self._spool = spool
        self.settler = Settler(records, counters, clock, tz)

    async def check(self, req: CheckRequest) -> Decision:
        """CheckBudget: check every scope of the key and hold the estimate, all or nothing."""
        now = self._clock.now()
        estimate = self._estimate(req)
        validation.text(req.request_id, "request_id")
        found = await self._credential(req.api_key, now)
        if isinstance(found, Decision):
            return found
        key, team = found
        refused = _model_refusal(key, team, req.model)
        if refused is not None:
            return refused
        scopes = request_scopes(key, team, now, self._tz)
        reservation_id = self._codec.encode(team.team_id, key.key_id, now)
        result = await self._reserve(team.team_id, scopes, estimate, reservation_id, now)
        if result.status is ReserveStatus.DENIED:
            return self._denial(key, team, scopes, result, now)
        index = tightest(scopes, result.states)
        return _decision(
            True, key, scopes[index], result.states[index], now,
            reservation_id=reservation_id, reserved=estimate,
        )  # fmt: skip

    async def record(self, req: SpendRequest) -> SpendResult:
        """RecordSpend: write the ledger row once, then settle the hold and the counters."""
        now = self._clock.now()
        validation.text(req.request_id, "request_id", required=True)
        cost = self._cost(req)
        metadata = validation.metadata(req.metadata)
        key, team, admitted_at = await self._spend_target(req, now)
        scopes = request_scopes(key, team, admitted_at, self._tz)
        entry = LedgerEntry(
            request_id=req.request_id,
            team_id=team.team_id,
            key_id=key.key_id,
            cost_nanos=cost,
            admitted_at=admitted_at,
            recorded_at=now,
            reservation_id=req.reservation_id,
            model=req.model,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.completion_tokens,
            metadata=metadata,
        )
        try:
            # Counters exist before the ledger row does (a store without ledger snapshots
            # could not tell a rebuild that summed this row from one that did not).
            await self._ensure(team.team_id, scopes, req.request_id, now)
            stored = await self._records.insert_spend(entry)
        except RecordsUnavailable:
            if self._spool is None:
                raise
            return await self._record_spooled(entry, key, team, scopes, now)
        if not stored.inserted:
            return await self._duplicate(stored, entry, key, team, now)
        settled = await self._counters.settle(
            team.team_id, req.reservation_id, scopes, cost, req.request_id, now, DEDUPE_TTL,
            xact=stored.xact,
        )  # fmt: skip
        if settled.unsettled:
            await self.settler.recover(team.team_id, settled.unsettled)
        states = await self._fill(team.team_id, scopes, settled.states, now)
        return SpendResult(
            cost, states[1].spend, states[0].spend, False, team.team_id, key.key_id, key.key_alias
        )

    async def release(self, reservation_id: str) -> bool:
        """Drop a hold without spending (the request never reached the upstream)."""
        ref = self._codec.decode(reservation_id)
        if ref is None:
            raise NotFound("reservation_id is not one budgetd issued")
        return await self._counters.release(ref.team_id, reservation_id, self._clock.now())

    # -- check helpers ------------------------------------------------------------------

    def _estimate(self, req: CheckRequest) -> int:
        validation.text(req.model, "model")
        if req.estimated_cost is not None:
            return validation.cost(req.estimated_cost, "estimated_cost")
        if req.max_tokens is None:
            return 0
        completion = validation.tokens(req.max_tokens, "max_tokens")
        prompt = validation.tokens(req.prompt_tokens or 0, "prompt_tokens")
        return price_nanos(self._prices, req.model, prompt, completion) or 0

    async def _credential(
        self, api_key: str, now: float
    ) -> tuple[KeyRecord, TeamRecord] | Decision:
        if not api_key:
            return _refusal(Reason.KEY_INVALID, "No API key passed in the request.")
        if len(api_key) > validation.MAX_TEXT:
            return _refusal(Reason.KEY_INVALID, "Invalid API key.")
        key = await self._records.get_key_by_hash(hash_api_key(api_key))
        if key is None:
            return _refusal(Reason.KEY_INVALID, "Invalid API key.")
        if key.revoked_at is not None:
            return _refusal(Reason.KEY_INVALID, "API key has been revoked.", key)
        if key.expires_at is not None and key.expires_at <= now:
            return _refusal(Reason.KEY_EXPIRED, "Authentication Error - Expired Key.", key)
        team = await self._records.get_team(key.team_id)
        if team is None:
            return _refusal(Reason.KEY_INVALID, "API key's team no longer exists.", key)
        if team.blocked:
            return _refusal(
                Reason.TEAM_BLOCKED, f"Team {team.team_id} is blocked.", key, ScopeKind.TEAM
            )
        return key, team

    async def _reserve(
        self,
        team_id: str,
        scopes: list[ScopeBudget],
        amount: int,
        reservation_id: str,
        now: float,
    ) -> ReserveResult:
        for _ in range(_REBUILD_ATTEMPTS):
            result = await self._counters.reserve(
                team_id, scopes, amount, reservation_id, now + self._ttl, now, self._enforcement
            )
            if result.unsettled:
                await self.settler.recover(team_id, result.unsettled)
            if result.status is not ReserveStatus.MISSING:
                return result
            missing = [scopes[i] for i in result.missing]
            try:
                await rebuild(self._records, self._counters, team_id, missing, now)
            except RecordsUnavailable:
                if self._spool is None:
                    raise
                await start_from_zero(self._counters, team_id, missing, now)
        raise Unavailable("counters keep disappearing; is the counter store being flushed?")

    def _denial(
        self,
        key: KeyRecord,
        team: TeamRecord,
        scopes: list[ScopeBudget],
        result: ReserveResult,
        now: float,
    ) -> Decision:
        scope = scopes[result.denied_index]
        state = result.states[result.denied_index]
        limit = scope.limit_nanos if scope.limit_nanos is not None else 0
        message = budget_exceeded_message(state.spend + state.held, limit)
        return _decision(
            False, key, scope, state, now, reason=Reason.BUDGET_EXCEEDED, message=message
        )

    # -- record helpers -----------------------------------------------------------------

    def _cost(self, req: SpendRequest) -> int:
        validation.text(req.model, "model")
        prompt = validation.tokens(req.prompt_tokens, "prompt_tokens")
        completion = validation.tokens(req.completion_tokens, "completion_tokens")
        if req.cost is not None:
            return validation.cost(req.cost)
        if not req.model:
            raise InvalidArgument("cost is required (or model with prompt/completion tokens)")
        priced = price_nanos(self._prices, req.model, prompt, completion)
        if priced is None:
            raise InvalidArgument(
                f"no price configured for model {req.model!r}: pass cost, or add the model to"
                " model_list with input_cost_per_token and output_cost_per_token"
            )
        return priced

    async def _spend_target(
        self, req: SpendRequest, now: float
    ) -> tuple[KeyRecord, TeamRecord, float]:
        if req.reservation_id:
            ref = self._codec.decode(req.reservation_id)
            if ref is None:
                raise NotFound("reservation_id is not one budgetd issued")
            key = await self._records.get_key(ref.key_id)
            team = await self._records.get_team(ref.team_id)
            admitted_at = ref.admitted_at
        elif req.api_key:
            key = await self._records.get_key_by_hash(hash_api_key(req.api_key))
            if key is None:
                raise NotFound("api_key is not a key budgetd issued")
            team = await self._records.get_team(key.team_id)
            admitted_at = now
        else:
            raise InvalidArgument("reservation_id or api_key is required")
        if key is None or team is None:
            raise NotFound("the key or team of this spend no longer exists")
        return key, team, admitted_at

    async def _ensure(
        self, team_id: str, scopes: list[ScopeBudget], request_id: str, now: float
    ) -> None:
        """Counters present before the ledger insert, and the settle to come announced."""
        grace = min(self._ttl, MAX_SETTLE_GRACE)
        states = await self._counters.begin_settle(team_id, scopes, request_id, now, grace)
        missing = [s for s, state in zip(scopes, states, strict=True) if state is None]
        if missing:
            await rebuild(self._records, self._counters, team_id, missing, now)

    async def _fill(
        self,
        team_id: str,
        scopes: list[ScopeBudget],
        states: tuple[CounterState | None, ...],
        now: float,
    ) -> tuple[CounterState, ...]:
        """States with any missing counter rebuilt from the ledger (which holds this row)."""
        missing = [s for s, state in zip(scopes, states, strict=True) if state is None]
        if not missing:
            return tuple(s for s in states if s is not None)
        await rebuild(self._records, self._counters, team_id, missing, now)
        read = await self._counters.read(team_id, scopes, now)
        return tuple(s if s is not None else CounterState(0, 0) for s in read)

    async def _record_spooled(
        self,
        entry: LedgerEntry,
        key: KeyRecord,
        team: TeamRecord,
        scopes: list[ScopeBudget],
        now: float,
    ) -> SpendResult:
        """RecordSpend while the record store is down: spool the row, then settle counters.

        The spool is fsynced before the counters change and before the answer, so an OK
        survives a crash of this process; the row reaches the ledger at replay. A retry of
        the same request_id is answered duplicate by the counters' dedupe marker. A retry
        with another cost cannot be told apart until replay: the ledger keeps the first
        one replayed, and the other goes to the spool's conflicts file.
        """
        assert self._spool is not None
        await self._spool.append(entry)
        read = await self._counters.read(team.team_id, scopes, now)
        missing = [s for s, state in zip(scopes, read, strict=True) if state is None]
        if missing:
            await start_from_zero(self._counters, team.team_id, missing, now)
        settled = await self._counters.settle(
            team.team_id, entry.reservation_id, scopes, entry.cost_nanos, entry.request_id,
            now, DEDUPE_TTL,
        )  # fmt: skip
        if settled.unsettled:
            await self.settler.recover(team.team_id, settled.unsettled)
        key_spend, team_spend = (s.spend if s is not None else 0 for s in settled.states)
        return SpendResult(
            entry.cost_nanos, team_spend, key_spend, not settled.applied,
            team.team_id, key.key_id, key.key_alias,
        )  # fmt: skip

    async def _duplicate(
        self,
        found: LedgerInsert,
        attempt: LedgerEntry,
        key: KeyRecord,
        team: TeamRecord,
        now: float,
    ) -> SpendResult:
        """A retry of a recorded request: same cost and key → its recorded answer."""
        stored = found.entry
        conflict = _conflict(stored, attempt)
        recent = now - stored.recorded_at < DEDUPE_TTL
        if conflict or not recent:
            # This attempt settles nothing: withdraw its announcement, or crash recovery
            # would settle the stored row again once the dedupe marker is gone.
            await self._counters.abandon_settle(attempt.team_id, attempt.request_id, now)
        if conflict:
            raise FailedPrecondition(conflict)
        # The answer is about the windows the request was admitted in, whenever it is retried.
        scopes = request_scopes(key, team, stored.admitted_at, self._tz)
        if recent:
            # The first attempt may have written the ledger and failed before the counters:
            # settling again is a no-op if it did get there (request ids are remembered).
            settled = await self._counters.settle(
                stored.team_id,
                stored.reservation_id,
                scopes,
                stored.cost_nanos,
                stored.request_id,
                now,
                DEDUPE_TTL,
                xact=found.xact,  # a counter rebuilt since, whose sum has the row, is left alone
            )
            if settled.unsettled:
                await self.settler.recover(stored.team_id, settled.unsettled)
            states = await self._fill(stored.team_id, scopes, settled.states, now)
        else:
            states = await read_states(self._records, self._counters, stored.team_id, scopes, now)
        return SpendResult(
            stored.cost_nanos, states[1].spend, states[0].spend, True,
            team.team_id, key.key_id, key.key_alias,
        )  # fmt: skip


def _conflict(stored: LedgerEntry, attempt: LedgerEntry) -> str | None:
    """Why a retry of a recorded request_id is not the same request, or None."""
    if stored.key_id != attempt.key_id or stored.team_id != attempt.team_id:
        return f"request_id {stored.request_id!r} was already recorded for another key"
    if stored.cost_nanos != attempt.cost_nanos:
        return (
            f"request_id {stored.request_id!r} was already recorded with cost"
            f" {nanos_to_usd(stored.cost_nanos)!r}; this retry says"
            f" {nanos_to_usd(attempt.cost_nanos)!r}"
        )
    return None


def _refusal(
    reason: Reason,
    message: str,
    key: KeyRecord | None = None,
    scope: ScopeKind | None = ScopeKind.KEY,
) -> Decision:
    return Decision(
        allowed=False,
        reason=reason,
        message=message,
        team_id=key.team_id if key else "",
        key_id=key.key_id if key else "",
        key_alias=key.key_alias if key else "",
        scope=scope,
    )


def _model_refusal(key: KeyRecord, team: TeamRecord, model: str) -> Decision | None:
    for scope, allowed in ((ScopeKind.KEY, key.models), (ScopeKind.TEAM, team.models)):
        if allowed and model and model not in allowed and "all-proxy-models" not in allowed:
            return _refusal(
                Reason.MODEL_NOT_ALLOWED,
                f"{scope.value} not allowed to access model={model}."
                f" Allowed models: {list(allowed)}",
                key,
                scope,
            )
    return None


def _decision(
    allowed: bool,
    key: KeyRecord,
    scope: ScopeBudget,
    state: CounterState,
    now: float,
    *,
    reason: Reason = Reason.NONE,
    message: str = "",
    reservation_id: str = "",
    reserved: int = 0,
) -> Decision:
    limit = scope.limit_nanos
    remaining = None if limit is None else max(0, limit - state.spend - state.held)
    reset_at = float(scope.window.end) if scope.window.end is not None else None
    retry_after = None
    if not allowed and reset_at is not None:
        retry_after = round(max(0.0, reset_at - now), 3)
    return Decision(
        allowed=allowed,
        reason=reason,
        message=message,
        team_id=key.team_id,
        key_id=key.key_id,
        key_alias=key.key_alias,
        scope=scope.kind,
        spend_nanos=state.spend,
        max_budget_nanos=limit,
        remaining_nanos=remaining,
        budget_reset_at=reset_at,
        reservation_id=reservation_id,
        reserved_nanos=reserved if allowed else 0,
        retry_after=retry_after,
    )
