"""RecordSpend: what a request spent, written to the ledger once and settled into the counters.

:class:`server.authority.Authority` owns a :class:`SpendRecorder` and hands it every
RecordSpend. Like the decision path it never reads the wall clock or the environment: the
stores, clock and settings are those the authority was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import tzinfo

from server import answers, validation
from server.clock import Clock
from server.decision import SpendRequest, SpendResult
from server.errors import FailedPrecondition, InvalidArgument, NotFound, RecordsUnavailable
from server.identity import ReservationCodec, hash_api_key
from server.ledger_sync import read_states, rebuild, start_from_zero
from server.money import nanos_to_usd
from server.pricing import Price, price_nanos
from server.principals import Principals
from server.scopes import Principal, rate_limits, request_scopes
from server.settling import DEDUPE_TTL, MAX_SETTLE_GRACE, Settler
from server.spool import Spool
from server.storage.base import (
    CounterState,
    CounterStore,
    LedgerEntry,
    LedgerInsert,
    RateCharge,
    RateUnit,
    RecordStore,
    ScopeBudget,
)
from server.windows import WindowCache


class SpendRecorder:
    """Records RecordSpend against one record and counter store.

    Its principals, windows and settler are its authority's own, shared with CheckBudget.
    """

    def __init__(
        self,
        records: RecordStore,
        counters: CounterStore,
        clock: Clock,
        codec: ReservationCodec,
        *,
        reservation_ttl: float,
        tz: tzinfo,
        prices: Mapping[str, Price],
        spool: Spool | None,
        principals: Principals,
        windows: WindowCache,
        settler: Settler,
    ) -> None:
        self._records = records
        self._counters = counters
        self._clock = clock
        self._codec = codec
        self._ttl = reservation_ttl
        self._tz = tz
        self._prices = prices
        self._spool = spool
        self._principals = principals
        self._windows = windows
        self._settler = settler

    async def record(self, req: SpendRequest) -> SpendResult:
        """RecordSpend: write the ledger row once, then settle the hold and the counters."""
        now = self._clock.now()
        validation.text(req.request_id, "request_id", required=True)
        cost = self._cost(req)
        metadata = validation.metadata(req.metadata)
        who, admitted_at, estimated_tokens = await self._spend_target(req, now)
        scopes = request_scopes(who, admitted_at, self._tz, req.model, windows=self._windows)
        entry = LedgerEntry(
            request_id=req.request_id,
            team_id=who.team.team_id,
            key_id=who.key_id,
            cost_nanos=cost,
            admitted_at=admitted_at,
            recorded_at=now,
            reservation_id=req.reservation_id,
            model=req.model,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=req.completion_tokens,
            metadata=metadata,
            user_id=who.user_id,
        )
        rates = _token_corrections(who, req, estimated_tokens)
        try:
            # Counters exist before the ledger row does (a store without ledger snapshots
            # could not tell a rebuild that summed this row from one that did not).
            await self._ensure(who.team.team_id, scopes, req.request_id, now)
            stored = await self._records.insert_spend(entry)
        except RecordsUnavailable:
            if self._spool is None:
                raise
            return await self._record_spooled(entry, who, scopes, now, rates)
        if not stored.inserted:
            return await self._duplicate(stored, entry, who, now)
        settled = await self._counters.settle(
            who.team.team_id, req.reservation_id, scopes, cost, req.request_id, now,
            DEDUPE_TTL, xact=stored.xact, rates=rates,
        )  # fmt: skip
        if settled.unsettled:
            await self._settler.recover(who.team.team_id, settled.unsettled)
        states = await self._fill(who.team.team_id, scopes, settled.states, now)
        return answers.spend_result(cost, who, scopes, states, duplicate=False)

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

    async def _spend_target(self, req: SpendRequest, now: float) -> tuple[Principal, float, int]:
        """Who a spend is charged to, the instant its request was admitted, tokens held."""
        if req.reservation_id:
            ref = self._codec.decode(req.reservation_id)
            if ref is None:
                raise NotFound("reservation_id is not one budgetd issued")
            who = await self._principals.for_spend(ref.team_id, ref.key_id, ref.user_id)
            admitted_at, tokens = ref.admitted_at, ref.estimated_tokens
        elif req.api_key:
            key = await self._records.get_key_by_hash(hash_api_key(req.api_key))
            if key is None:
                raise NotFound("api_key is not a key budgetd issued")
            who = await self._principals.for_spend(key.team_id, key.key_id, key.user_id)
            admitted_at, tokens = now, 0
        else:
            raise InvalidArgument("reservation_id or api_key is required")
        if who is None:
            raise NotFound("the key or team of this spend no longer exists")
        return who, admitted_at, tokens

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
        who: Principal,
        scopes: list[ScopeBudget],
        now: float,
        rates: Sequence[RateCharge],
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
        read = await self._counters.read(who.team.team_id, scopes, now)
        missing = [s for s, state in zip(scopes, read, strict=True) if state is None]
        if missing:
            await start_from_zero(self._counters, who.team.team_id, missing, now)
        settled = await self._counters.settle(
            who.team.team_id, entry.reservation_id, scopes, entry.cost_nanos,
            entry.request_id, now, DEDUPE_TTL, rates=rates,
        )  # fmt: skip
        if settled.unsettled:
            await self._settler.recover(who.team.team_id, settled.unsettled)
        states = tuple(s if s is not None else CounterState(0, 0) for s in settled.states)
        return answers.spend_result(
            entry.cost_nanos, who, scopes, states, duplicate=not settled.applied
        )

    async def _duplicate(
        self,
        found: LedgerInsert,
        attempt: LedgerEntry,
        who: Principal,
        now: float,
    ) -> SpendResult:
        """A retry of a recorded request: same cost and key → its recorded answer."""
        stored = found.entry
        conflict = _conflict(stored, attempt)
        # A retried RecordSpend within DEDUPE_TTL seconds re-applies to the counters only if
        # the first attempt did not (the counter store remembers request ids this long).
        # Later retries are answered from the ledger alone.
        recent = now - stored.recorded_at < DEDUPE_TTL
        if conflict or not recent:
            # This attempt settles nothing: withdraw its announcement, or crash recovery
            # would settle the stored row again once the dedupe marker is gone.
            await self._counters.abandon_settle(attempt.team_id, attempt.request_id, now)
        if conflict:
            raise FailedPrecondition(conflict)
        # The answer is about the windows the request was admitted in, whenever it is retried.
        scopes = request_scopes(who, stored.admitted_at, self._tz, stored.model)
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
                await self._settler.recover(stored.team_id, settled.unsettled)
            states = await self._fill(stored.team_id, scopes, settled.states, now)
        else:
            states = await read_states(self._records, self._counters, stored.team_id, scopes, now)
        return answers.spend_result(stored.cost_nanos, who, scopes, states, duplicate=True)


def _token_corrections(who: Principal, req: SpendRequest, estimated: int) -> list[RateCharge]:
    """tpm corrections at settle: the actual tokens minus what the check charged.

    A spend given only as a cost, with no token counts, leaves the estimate standing.
    """
    actual = req.prompt_tokens + req.completion_tokens
    if actual == 0 and req.cost is not None:
        return []
    delta = actual - estimated
    if delta == 0:
        return []
    return [RateCharge(limit, delta) for limit in rate_limits(who) if limit.unit is RateUnit.TOKENS]


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
