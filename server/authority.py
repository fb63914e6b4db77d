"""The decision path: may this key spend now (CheckBudget), and what did it spend (RecordSpend).

The logic here never reads the wall clock or the environment: storage, clock and settings are
handed in. The comparison rule lives in ``server.rules``; the atomic check-and-hold across
every scope is the counter store's job (one Lua script in Redis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import tzinfo

from server import answers, validation
from server.clock import Clock
from server.decision import (
    CheckRequest,
    Decision,
    Reason,
    SpendRequest,
    SpendResult,
)
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RecordsUnavailable,
    Unavailable,
)
from server.hot import HotAllow, HotAnswers, HotEntry, HotKey
from server.identity import ReservationCodec, hash_api_key
from server.ledger_sync import read_states, rebuild, start_from_zero
from server.money import budget_exceeded_message, nanos_to_usd
from server.pricing import Price, price_nanos
from server.principals import Principals
from server.rules import Enforcement
from server.scopes import Principal, rate_limits, request_scopes, tightest
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
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
)
from server.storage.cached_records import CachedRecords
from server.storage.leasing import LeasingCounters, lease_key
from server.windows import WindowCache

__all__ = [
    "Authority",
    "CheckRequest",
    "Decision",
    "HotAllow",
    "Reason",
    "SpendRequest",
    "SpendResult",
]

# A retried RecordSpend within DEDUPE_TTL seconds re-applies to the counters only if the
# first attempt did not (the counter store remembers request ids this long). Later retries
# are answered from the ledger alone.
_REBUILD_ATTEMPTS = 3


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
        principals: Principals | None = None,
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
        self.principals = principals if principals is not None else Principals(records)
        self._windows = WindowCache()
        # The hot path needs the record cache (to know how long what it derived is fresh)
        # and leases (to admit without the store); without them every check is full.
        self._cached = records if isinstance(records, CachedRecords) else None
        self._leasing = counters if isinstance(counters, LeasingCounters) else None
        self._hot = HotAnswers() if self._cached and self._leasing else None
        self.settler = Settler(records, counters, clock, tz, self.principals)

    def check_hot(
        self,
        api_key: str,
        model: str,
        user_id: str,
        request_id: str,
        estimated_cost: float | None,
        max_tokens: int | None,
        prompt_tokens: int | None,
    ) -> HotAllow | None:
        """CheckBudget for a busy API key from the hot path (:mod:`server.hot`), or None.

        The same answer :meth:`check` gives, for the faces to try first: it takes the
        request's fields as they come off the wire, so a hot request builds no request or
        decision object. None means the full path decides (:meth:`check`), which includes
        every request the hot path has no entry for and every invalid one (the full path
        answers it with its error): nothing is held or counted then.
        """
        hot = self._hot
        if hot is None or not api_key or len(api_key) > validation.MAX_TEXT:
            return None
        entry = hot.get((api_key, model, user_id))
        if entry is None or len(request_id) > validation.MAX_TEXT or "\x00" in request_id:
            return None  # (an unusable request_id: the full path says why)
        sizing = entry.sizing
        if (
            sizing is not None
            and sizing[0] == estimated_cost
            and sizing[1] == max_tokens
            and sizing[2] == prompt_tokens
        ):
            estimate, tokens = sizing[3], sizing[4]
        else:
            try:
                estimate = self._estimate(model, estimated_cost, max_tokens, prompt_tokens)
                tokens = _estimated_tokens(max_tokens, prompt_tokens)
            except InvalidArgument:
                return None
            entry.sizing = (estimated_cost, max_tokens, prompt_tokens, estimate, tokens)
        return self._hot_answer(entry, self._clock.now(), estimate, tokens)

    async def check(self, req: CheckRequest) -> Decision:
        """CheckBudget: check every scope and rate limit, and hold the estimate, all or none."""
        hot = self.check_hot(
            req.api_key, req.model, req.user_id, req.request_id,
            req.estimated_cost, req.max_tokens, req.prompt_tokens,
        )  # fmt: skip
        if hot is not None:
            return answers.admitted(*hot)
        now = self._clock.now()
        estimate = self._estimate(req.model, req.estimated_cost, req.max_tokens, req.prompt_tokens)
        tokens = _estimated_tokens(req.max_tokens, req.prompt_tokens)
        validation.text(req.request_id, "request_id")
        hot_key = self._hot_key(req)
        writes = self._cached.writes if self._cached is not None else 0
        who = await self.principals.resolve(req, now)
        if isinstance(who, Decision):
            return who
        refused = answers.model_refusal(who, req.model)
        if refused is not None:
            return refused
        scopes = request_scopes(who, now, self._tz, req.model, windows=self._windows)
        rates = [
            RateCharge(limit, 1 if limit.unit is RateUnit.REQUESTS else tokens)
            for limit in rate_limits(who)
        ]
        reservation_id = self._codec.encode(
            who.team.team_id, who.key_id, now, user_id=who.user_id, estimated_tokens=tokens
        )
        result = await self._reserve(who.team.team_id, scopes, estimate, reservation_id, now, rates)
        if result.status is ReserveStatus.DENIED:
            return self._denial(who, scopes, result, now)
        if result.status is ReserveStatus.RATE_LIMITED:
            return answers.rate_denial(who, scopes, rates, result)
        if hot_key is not None and not rates:
            self._remember_hot(hot_key, who, scopes, writes)
        index = tightest(scopes, result.states)
        return answers.decision(
            True, who, scopes[index], result.states[index], now,
            reservation_id=reservation_id, reserved=estimate,
            soft=answers.soft_budget_exceeded(who, scopes, result.states),
            rate=answers.tightest_rate(result.rates),
        )  # fmt: skip

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
            await self.settler.recover(who.team.team_id, settled.unsettled)
        states = await self._fill(who.team.team_id, scopes, settled.states, now)
        return answers.spend_result(cost, who, scopes, states, duplicate=False)

    async def release(self, reservation_id: str) -> bool:
        """Drop a hold without spending (the request never reached the upstream)."""
        ref = self._codec.decode(reservation_id)
        if ref is None:
            raise NotFound("reservation_id is not one budgetd issued")
        return await self._counters.release(ref.team_id, reservation_id, self._clock.now())

    # -- check helpers ------------------------------------------------------------------

    def _hot_key(self, req: CheckRequest) -> HotKey | None:
        """The hot-path identity of an API-key request, or None (no hot path for it)."""
        if self._hot is None or not req.api_key or len(req.api_key) > validation.MAX_TEXT:
            return None
        return (req.api_key, req.model, req.user_id)

    def _hot_answer(
        self, entry: HotEntry, now: float, estimate: int, tokens: int
    ) -> HotAllow | None:
        """An allow from a hot entry and this replica's lease, or None: the full path
        decides (see :mod:`server.hot` for when an entry may be used)."""
        assert self._cached is not None and self._leasing is not None
        if not entry.covers(now) or not self._cached.still_fresh(entry.freshness):
            return None
        reservation_id = self._codec.encode_after(entry.prefix, now, tokens)
        states = self._leasing.admit_from(
            entry.lease, estimate, reservation_id, now + self._ttl, now
        )
        if states is None:
            return None
        template = entry.template
        if template is None or entry.states is not states:
            # The first hot answer of this entry: the shape of its answers, worked out once.
            who = entry.who
            scopes = entry.scopes
            index = tightest(scopes, states)
            soft = answers.soft_budget_exceeded(who, scopes, states)
            template = answers.decision(True, who, scopes[index], states[index], now, soft=soft)
            entry.template, entry.states = template, states
        return HotAllow(template, reservation_id, estimate)

    def _remember_hot(
        self, key: HotKey, who: Principal, scopes: list[ScopeBudget], writes: int
    ) -> None:
        """Keep what this full decision derived for the key's next requests (server.hot):
        only for a key this replica holds a lease for (a hot one: the others are decided by
        the store anyway), and not when a record was written while it was being resolved."""
        assert self._hot is not None and self._cached is not None and self._leasing is not None
        lease = self._leasing.lease_for(who.team.team_id, lease_key(scopes, self._enforcement))
        if lease is None:
            return
        freshness = self._cached.freshness(hash_api_key(key[0]), who.team.team_id, who.user_id)
        if freshness is None or freshness.writes != writes:
            return
        prefix = self._codec.prefix(who.team.team_id, who.key_id, who.user_id)
        self._hot.remember(key, who, scopes, lease, freshness, prefix)

    def _estimate(
        self,
        model: str,
        estimated_cost: float | None,
        max_tokens: int | None,
        prompt_tokens: int | None,
    ) -> int:
        """The hold a check places: its estimated cost, else its tokens priced, else 0."""
        validation.text(model, "model")
        if estimated_cost is not None:
            return validation.cost(estimated_cost, "estimated_cost")
        if max_tokens is None:
            return 0
        completion = validation.tokens(max_tokens, "max_tokens")
        prompt = validation.tokens(prompt_tokens or 0, "prompt_tokens")
        return price_nanos(self._prices, model, prompt, completion) or 0

    async def _reserve(
        self,
        team_id: str,
        scopes: list[ScopeBudget],
        amount: int,
        reservation_id: str,
        now: float,
        rates: Sequence[RateCharge],
    ) -> ReserveResult:
        for _ in range(_REBUILD_ATTEMPTS):
            result = await self._counters.reserve(
                team_id, scopes, amount, reservation_id, now + self._ttl, now,
                self._enforcement, rates=rates,
            )  # fmt: skip
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
        who: Principal,
        scopes: list[ScopeBudget],
        result: ReserveResult,
        now: float,
    ) -> Decision:
        scope = scopes[result.denied_index]
        state = result.states[result.denied_index]
        limit = scope.limit_nanos if scope.limit_nanos is not None else 0
        message = budget_exceeded_message(state.spend + state.held, limit)
        return answers.decision(
            False, who, scope, state, now, reason=Reason.BUDGET_EXCEEDED, message=message
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

    async def _spend_target(self, req: SpendRequest, now: float) -> tuple[Principal, float, int]:
        """Who a spend is charged to, the instant its request was admitted, tokens held."""
        if req.reservation_id:
            ref = self._codec.decode(req.reservation_id)
            if ref is None:
                raise NotFound("reservation_id is not one budgetd issued")
            who = await self.principals.for_spend(ref.team_id, ref.key_id, ref.user_id)
            admitted_at, tokens = ref.admitted_at, ref.estimated_tokens
        elif req.api_key:
            key = await self._records.get_key_by_hash(hash_api_key(req.api_key))
            if key is None:
                raise NotFound("api_key is not a key budgetd issued")
            who = await self.principals.for_spend(key.team_id, key.key_id, key.user_id)
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
            await self.settler.recover(who.team.team_id, settled.unsettled)
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
                await self.settler.recover(stored.team_id, settled.unsettled)
            states = await self._fill(stored.team_id, scopes, settled.states, now)
        else:
            states = await read_states(self._records, self._counters, stored.team_id, scopes, now)
        return answers.spend_result(stored.cost_nanos, who, scopes, states, duplicate=True)


def _estimated_tokens(max_tokens: int | None, prompt_tokens: int | None) -> int:
    """Tokens a request may use, charged to tpm limits at check time (0 when unknown)."""
    prompt = validation.tokens(prompt_tokens or 0, "prompt_tokens")
    completion = validation.tokens(max_tokens or 0, "max_tokens")
    return prompt + completion


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
