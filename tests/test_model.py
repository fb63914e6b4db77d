"""Model-based test: random sequences of budgetd operations against a small reference model.

Hypothesis drives create team, issue key, check (with and without estimates), record
(including retries and conflicting retries), revoke and clock moves across window
boundaries, on both storage backends and both enforcement rules, and compares every answer
with the model below. The model is deliberately naive: a list of ledger rows and holds,
summed on demand.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from harness import BACKENDS, Backend, backend_urls, make_settings, open_backend
from server.admin import NewKey, NewTeam
from server.authority import CheckRequest, Reason, SpendRequest
from server.config import Settings
from server.errors import FailedPrecondition
from server.rules import Enforcement, admits
from server.storage.base import ScopeKind
from server.windows import parse_duration, window_at

T = TypeVar("T")
TTL = 60.0
DURATIONS = ["", "1s", "1m", "1h", "1d"]
MICRO = 1_000  # nano-USD per micro-USD: amounts are whole micro-dollars, exact on the wire


@dataclass
class MTeam:
    team_id: str
    limit: int | None
    duration: str


@dataclass
class MKey:
    key: str
    key_id: str
    team: MTeam
    limit: int | None
    duration: str
    revoked: bool = False


@dataclass
class MHold:
    key: MKey
    amount: int
    admitted_at: float
    expires_at: float
    settled: bool = False


@dataclass
class Model:
    """The reference: ledger rows (scope ids, cost, admitted_at) and holds."""

    mode: Enforcement
    ledger: dict[str, tuple[MKey, int, float]] = field(default_factory=dict)
    holds: dict[str, MHold] = field(default_factory=dict)

    def spend(self, kind: ScopeKind, key: MKey, at: float) -> int:
        window = self._window(kind, key, at)
        return sum(
            cost
            for k, cost, when in self.ledger.values()
            if self._scope_id(kind, k) == self._scope_id(kind, key) and window.contains(when)
        )

    def held(self, kind: ScopeKind, key: MKey, now: float) -> int:
        window = self._window(kind, key, now)
        return sum(
            h.amount
            for h in self.holds.values()
            if not h.settled
            and h.expires_at > now
            and self._scope_id(kind, h.key) == self._scope_id(kind, key)
            and window.contains(h.admitted_at)
        )

    def check(self, key: MKey, amount: int, now: float) -> tuple[bool, ScopeKind | None]:
        for kind, limit in ((ScopeKind.KEY, key.limit), (ScopeKind.TEAM, key.team.limit)):
            spend, held = self.spend(kind, key, now), self.held(kind, key, now)
            if not admits(self.mode, limit, spend, held, amount):
                return False, kind
        return True, None

    @staticmethod
    def _scope_id(kind: ScopeKind, key: MKey) -> str:
        return key.key_id if kind is ScopeKind.KEY else key.team.team_id

    @staticmethod
    def _window(kind: ScopeKind, key: MKey, at: float) -> Any:
        duration = key.duration if kind is ScopeKind.KEY else key.team.duration
        return window_at(parse_duration(duration), at, UTC)


class BudgetMachine(RuleBasedStateMachine):
    """One backend, one rule; each example gets fresh teams in the shared stores."""

    backend: Backend
    loop: asyncio.AbstractEventLoop
    mode: Enforcement

    keys = Bundle("keys")
    teams = Bundle("teams")
    reservations = Bundle("reservations")
    recorded = Bundle("recorded")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model(self.mode)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def next_id(self, prefix: str) -> str:
        # Unique across examples too: every example shares the same stores.
        return f"{prefix}-{uuid.uuid4().hex[:16]}"

    @initialize()
    def start_clock(self) -> None:
        self.backend.clock.set(1718318916.0)

    @rule(
        target=teams,
        limit=st.one_of(st.none(), st.integers(0, 20)),
        duration=st.sampled_from(DURATIONS),
    )
    def create_team(self, limit: int | None, duration: str) -> MTeam:
        team_id = self.next_id("team")
        max_budget = None if limit is None else limit * 1e-6
        self.run(
            self.backend.admin.create_team(
                NewTeam(
                    team_alias="m", team_id=team_id, max_budget=max_budget, budget_duration=duration
                )
            )
        )
        return MTeam(team_id, None if limit is None else limit * MICRO, duration)

    @rule(
        target=keys,
        team=teams,
        limit=st.one_of(st.none(), st.integers(0, 20)),
        duration=st.sampled_from(DURATIONS),
    )
    def issue_key(self, team: MTeam, limit: int | None, duration: str) -> MKey:
        issued = self.run(
            self.backend.admin.issue_key(
                NewKey(
                    team_id=team.team_id,
                    max_budget=None if limit is None else limit * 1e-6,
                    budget_duration=duration,
                )
            )
        )
        return MKey(
            issued.plaintext,
            issued.view.key.key_id,
            team,
            None if limit is None else limit * MICRO,
            duration,
        )

    @rule(target=reservations, key=keys, estimate=st.integers(0, 8))
    def check(self, key: MKey, estimate: int) -> str:
        now = self.backend.clock.now()
        decision = self.run(
            self.backend.authority.check(
                CheckRequest(api_key=key.key, estimated_cost=estimate * 1e-6 if estimate else None)
            )
        )
        if key.revoked:
            assert not decision.allowed and decision.reason is Reason.KEY_INVALID
            return ""
        allowed, scope = self.model.check(key, estimate * MICRO, now)
        assert decision.allowed == allowed, (decision, self.model)
        if not allowed:
            assert decision.reason is Reason.BUDGET_EXCEEDED
            assert decision.scope is scope
            assert scope is not None
            assert decision.spend_nanos == self.model.spend(scope, key, now)
            return ""
        if estimate:
            self.model.holds[decision.reservation_id] = MHold(key, estimate * MICRO, now, now + TTL)
        else:
            self.model.holds[decision.reservation_id] = MHold(key, 0, now, now + TTL)
        return decision.reservation_id

    @precondition(lambda self: True)
    @rule(target=recorded, reservation=consumes(reservations), cost=st.integers(0, 8))
    def record(self, reservation: str, cost: int) -> str:
        if not reservation:
            return ""
        hold = self.model.holds[reservation]
        request_id = self.next_id("req")
        result = self.run(
            self.backend.authority.record(
                SpendRequest(request_id=request_id, reservation_id=reservation, cost=cost * 1e-6)
            )
        )
        hold.settled = True
        self.model.ledger[request_id] = (hold.key, cost * MICRO, hold.admitted_at)
        assert not result.duplicate
        assert result.team_spend_nanos == self.model.spend(
            ScopeKind.TEAM, hold.key, hold.admitted_at
        )
        assert result.key_spend_nanos == self.model.spend(ScopeKind.KEY, hold.key, hold.admitted_at)
        return request_id

    @rule(request_id=recorded, conflicting=st.booleans())
    def retry_record(self, request_id: str, conflicting: bool) -> None:
        if not request_id:
            return
        key, cost, admitted_at = self.model.ledger[request_id]
        request = SpendRequest(
            request_id=request_id,
            api_key=key.key,
            cost=(cost + (MICRO if conflicting else 0)) / 1e9,
        )
        if conflicting:
            with pytest.raises(FailedPrecondition):
                self.run(self.backend.authority.record(request))
            return
        result = self.run(self.backend.authority.record(request))
        assert result.duplicate and result.cost_nanos == cost
        assert result.team_spend_nanos == self.model.spend(ScopeKind.TEAM, key, admitted_at)

    @rule(key=keys)
    def revoke(self, key: MKey) -> None:
        self.run(self.backend.admin.revoke_key(key_id=key.key_id))
        key.revoked = True

    @rule(seconds=st.sampled_from([0.4, 1.0, 30.0, 61.0, 600.0, 3600.0, 86400.0]))
    def advance_clock(self, seconds: float) -> None:
        self.backend.clock.advance(seconds)

    @invariant()
    def team_spend_matches_the_model(self) -> None:
        now = self.backend.clock.now()
        seen: set[str] = set()
        for key, _, _ in list(self.model.ledger.values())[-3:]:
            if key.team.team_id in seen:
                continue
            seen.add(key.team.team_id)
            view = self.run(self.backend.admin.get_team(key.team.team_id))
            assert view.spend_nanos == self.model.spend(ScopeKind.TEAM, key, now)
            assert math.isfinite(float(view.spend_nanos))


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Settings]:
    urls = backend_urls(request, request.param)
    return request.param, make_settings(tmp_path, **urls, reservation_ttl=TTL)


@pytest.mark.parametrize("mode", [Enforcement.CROSS_ONCE, Enforcement.NEVER_EXCEED])
def test_budgetd_agrees_with_the_reference_model(
    backend_settings: tuple[str, Settings], mode: Enforcement
) -> None:
    name, base = backend_settings
    config = make_settings(
        Path(str(base.data_dir)).parent,
        database_url=base.database_url,
        redis_url=base.redis_url,
        enforcement=mode,
        reservation_ttl=TTL,
    )
    loop = asyncio.new_event_loop()
    context = open_backend(name, config)
    backend = loop.run_until_complete(context.__aenter__())
    try:
        machine = type(
            "Machine", (BudgetMachine,), {"backend": backend, "loop": loop, "mode": mode}
        )
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=25,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )
    finally:
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()
