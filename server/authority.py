"""The decision path: may this key spend now (CheckBudget), and what did it spend (RecordSpend).

The logic here never reads the wall clock or the environment: storage, clock and settings are
handed in. The comparison rule lives in ``server.rules``; the atomic check-and-hold across
every scope is the counter store's job (one Lua script in Redis). RecordSpend's side is
:mod:`server.recording`.
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
    InvalidArgument,
    NotFound,
    RecordsUnavailable,
    Unavailable,
)
from server.hot import HotAllow, HotAnswers, HotEntry, HotKey
from server.identity import ReservationCodec, hash_api_key
from server.ledger_sync import rebuild, start_from_zero
from server.money import budget_exceeded_message
from server.pricing import Price, price_nanos
from server.principals import Principals
from server.recording import SpendRecorder
from server.rules import Enforcement
from server.scopes import Principal, rate_limits, request_scopes, tightest
from server.settling import Settler
from server.spool import Spool
from server.storage.base import (
    CounterStore,
    RateCharge,
    RateUnit,
    RecordStore,
    ReserveResult,
    ReserveStatus,
    ScopeBudget,
)
from server.storage.cached_records import CachedRecords
from server.storage.lease import lease_key
from server.storage.leasing import LeasingCounters
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
        self._recorder = SpendRecorder(
            records,
            counters,
            clock,
            codec,
            reservation_ttl=reservation_ttl,
            tz=tz,
            prices=prices,
            spool=spool,
            principals=self.principals,
            windows=self._windows,
            settler=self.settler,
        )

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
        """RecordSpend (see :meth:`server.recording.SpendRecorder.record`)."""
        return await self._recorder.record(req)

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
        # Inside every window of the entry and before the key expires, and still fresh.
        if not entry.opens <= now < entry.closes or not self._cached.still_fresh(entry.freshness):
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


def _estimated_tokens(max_tokens: int | None, prompt_tokens: int | None) -> int:
    """Tokens a request may use, charged to tpm limits at check time (0 when unknown)."""
    prompt = validation.tokens(prompt_tokens or 0, "prompt_tokens")
    completion = validation.tokens(max_tokens or 0, "max_tokens")
    return prompt + completion
