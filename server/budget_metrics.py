"""Prometheus values read from shared state at scrape time, and budgetd's exact spend counter.

:class:`BudgetCollector` exports LiteLLM's budget gauges, with LiteLLM's names and labels
(team labels in the seed's order, ``team_alias`` then ``team_id``):

* ``litellm_remaining_team_budget_metric{team_alias, team_id}``: ``max_budget - spend`` of
  the current window, as LiteLLM computes it: negative once a request crossed the line
  (the seed's team, 1e-09 with 3.5e-06 spent, shows -3.499e-06), ``+Inf`` when unlimited;
* ``litellm_team_max_budget_metric``, ``litellm_team_budget_remaining_hours_metric``
  (hours to ``budget_reset_at``; absent when the budget never resets, as in LiteLLM);
* ``litellm_remaining_api_key_budget_metric{hashed_api_key, api_key_alias}``,
  ``litellm_api_key_max_budget_metric``, ``litellm_api_key_budget_remaining_hours_metric``
  (``hashed_api_key`` is the key's SHA-256 hex, as LiteLLM's);

and budgetd's ``budgetd_holds_outstanding_usd{team_id}`` (estimates held by requests in
flight; a hold that expired since the team's last decision still counts until then) and
``budgetd_counter_drift_usd{team_id}`` (|counter - ledger| of the current window's spend).

Every value is read when Prometheus scrapes, from the record store and the counters every
replica shares, so any replica reports every team correctly, whichever one handled the
spend, and a reset shows at the first scrape after it. Nothing is read per request. The
work of one scrape is bounded: at most :data:`MAX_TEAMS` teams and :data:`MAX_KEYS` keys
(``budgetd_budget_listing_truncated`` says when there were more), one counter read per team
(all its keys in the same round trip, :data:`READ_CONCURRENCY` teams at a time; a missing
counter is rebuilt from the ledger, as any read does), and ledger sums for drift of at most
:data:`DRIFT_TEAMS_PER_SCRAPE` teams: those that drifted at the last check first, then the
next teams in id order, so every team is checked every ``teams / 50`` scrapes. A settle in
flight during a scrape can show as drift for one scrape; only drift that stays is a problem.
Scrapes that arrive while one is reading share its answer.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import tzinfo
from typing import TYPE_CHECKING, Final, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from server.clock import Clock
from server.errors import BudgetdError
from server.ledger_sync import read_states
from server.money import nanos_to_usd
from server.scopes import key_scope, team_scope
from server.storage.base import (
    CounterState,
    CounterStore,
    KeyRecord,
    RecordStore,
    ScopeBudget,
    ScopeKind,
    TeamRecord,
)

if TYPE_CHECKING:
    from server.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("budgetd.metrics")

PAGE: Final = 1000
MAX_TEAMS: Final = 10_000
MAX_KEYS: Final = 50_000
READ_CONCURRENCY: Final = 16
DRIFT_TEAMS_PER_SCRAPE: Final = 50
SCRAPE_TIMEOUT: Final = 10.0
"""Seconds a scrape may spend reading; past that the budget series are left out."""

TEAM_LABELS: Final = ("team_alias", "team_id")
KEY_LABELS: Final = ("hashed_api_key", "api_key_alias")


@dataclass(frozen=True, slots=True)
class Budget:
    """One team's or key's budget as read at scrape time, with its metric labels."""

    scope: ScopeBudget
    state: CounterState
    labels: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything one scrape read."""

    now: float
    teams: tuple[Budget, ...]
    keys: tuple[Budget, ...]
    drift: dict[str, int]  # team_id -> |counter - ledger| in nano-USD, non-zero only
    drift_checked: int
    truncated: bool


class BudgetCollector:
    """A Prometheus collector of budgets and holds read from shared state at scrape time."""

    def __init__(
        self,
        records: RecordStore,
        counters: CounterStore,
        clock: Clock,
        tz: tzinfo,
        *,
        on_error: Callable[[BudgetdError], None] | None = None,
    ) -> None:
        self._records = records
        self._counters = counters
        self._clock = clock
        self._tz = tz
        self._on_error = on_error
        self._snapshot: Snapshot | None = None
        self._seconds = 0.0
        self._inflight: asyncio.Future[tuple[Snapshot | None, float]] | None = None
        self._drifting: dict[str, int] = {}
        self._drift_cursor = ""

    def attach(self, metrics: Metrics) -> None:
        """Export through ``metrics``' registry, read before each scrape."""
        metrics.registry.register(self)
        metrics.on_scrape(self.refresh)
        self._on_error = self._on_error or metrics.failure

    async def refresh(self) -> None:
        """Read every budget now (or join the read already under way)."""
        task = self._inflight
        if task is None or task.done():
            task = self._inflight = asyncio.ensure_future(self._read_guarded())
        # Shielded: a scraper that hangs up must not cancel the read other scrapes share.
        self._snapshot, self._seconds = await asyncio.shield(task)

    def describe(self) -> list[Metric]:
        # Registering must not read storage (it would run collect()).
        return []

    def collect(self) -> Iterator[Metric]:
        """The families of the last read (called by the exposition, right after refresh)."""
        snap = self._snapshot
        yield _gauge(
            "budgetd_budget_scrape_ok",
            "1 when this scrape read every budget from shared state; 0 when it could not "
            "(a backend failed or was too slow) and the budget series are left out",
            1 if snap else 0,
        )
        yield _gauge(
            "budgetd_budget_scrape_duration_seconds",
            "Time this scrape took to read budgets from shared state",
            self._seconds,
        )
        if snap is not None:
            yield from _families(snap)

    async def _read_guarded(self) -> tuple[Snapshot | None, float]:
        started = time.perf_counter()
        try:
            snap: Snapshot | None = await asyncio.wait_for(self._read(), SCRAPE_TIMEOUT)
        except BudgetdError as exc:
            log.warning("metrics: cannot read budgets (%s): %s", type(exc).__name__, exc)
            if self._on_error is not None:
                self._on_error(exc)
            snap = None
        except TimeoutError:
            log.warning("metrics: reading budgets took over %.0f s", SCRAPE_TIMEOUT)
            snap = None
        return snap, time.perf_counter() - started

    async def _read(self) -> Snapshot:
        now = self._clock.now()
        teams, teams_cut = await _listing(self._records.list_teams, _team_id, MAX_TEAMS)
        keys, keys_cut = await _listing(
            lambda after, n: self._records.list_keys("", after, n), _key_id, MAX_KEYS
        )
        by_team: dict[str, list[KeyRecord]] = {}
        for key in keys:
            by_team.setdefault(key.team_id, []).append(key)
        team_budgets: list[Budget] = []
        key_budgets: list[Budget] = []
        for i in range(0, len(teams), READ_CONCURRENCY):
            chunk = teams[i : i + READ_CONCURRENCY]
            reads = [self._read_team(t, by_team.get(t.team_id, []), now) for t in chunk]
            for team_budget, of_keys in await asyncio.gather(*reads):
                team_budgets.append(team_budget)
                key_budgets.extend(of_keys)
        drift, checked = await self._drift(team_budgets)
        return Snapshot(
            now, tuple(team_budgets), tuple(key_budgets), drift, checked, teams_cut or keys_cut
        )

    async def _read_team(
        self, team: TeamRecord, keys: Sequence[KeyRecord], now: float
    ) -> tuple[Budget, list[Budget]]:
        """The team's and its keys' counters, in one read of the team's counters."""
        scopes = [team_scope(team, now, self._tz), *(key_scope(k, now, self._tz) for k in keys)]
        states = await read_states(self._records, self._counters, team.team_id, scopes, now)
        of_keys = [
            Budget(scope, state, (key.key_hash, key.key_alias))
            for key, scope, state in zip(keys, scopes[1:], states[1:], strict=True)
        ]
        return Budget(scopes[0], states[0], (team.team_alias, team.team_id)), of_keys

    async def _drift(self, teams: Sequence[Budget]) -> tuple[dict[str, int], int]:
        """|counter - ledger| of the teams due a check this scrape (see the module doc)."""
        by_id = {b.scope.scope_id: b for b in teams}
        again = [team_id for team_id in self._drifting if team_id in by_id]
        ids = sorted(by_id)
        start = bisect.bisect_right(ids, self._drift_cursor)
        fresh = [t for t in ids[start:] + ids[:start] if t not in self._drifting]
        fresh = fresh[: max(0, DRIFT_TEAMS_PER_SCRAPE - len(again))]
        chosen = again[:DRIFT_TEAMS_PER_SCRAPE] + fresh
        if fresh:
            self._drift_cursor = fresh[-1]
        drifting = {t: d for t, d in self._drifting.items() if t in by_id and t not in chosen}
        for team_id in chosen:
            budget = by_id[team_id]
            window = budget.scope.window
            ledger = await self._records.sum_spend(
                ScopeKind.TEAM, team_id, window.start, window.end
            )
            if ledger != budget.state.spend:
                drifting[team_id] = abs(ledger - budget.state.spend)
        self._drifting = drifting
        return dict(drifting), len(chosen)


def _families(snap: Snapshot) -> Iterator[Metric]:
    team_remaining = _family(
        "litellm_remaining_team_budget_metric",
        "Remaining budget for team: max_budget - spend in the current window (+Inf: unlimited)",
        TEAM_LABELS,
    )
    team_max = _family("litellm_team_max_budget_metric", "Maximum budget set for team", TEAM_LABELS)
    team_hours = _family(
        "litellm_team_budget_remaining_hours_metric",
        "Hours until the team's budget resets (budget_reset_at)",
        TEAM_LABELS,
    )
    holds = _family(
        "budgetd_holds_outstanding_usd",
        "USD held by requests admitted and not yet settled, per team",
        ("team_id",),
    )
    for budget in snap.teams:
        _budget_values(budget, snap.now, team_remaining, team_max, team_hours)
        holds.add_metric((budget.scope.scope_id,), nanos_to_usd(budget.state.held))
    key_remaining = _family(
        "litellm_remaining_api_key_budget_metric",
        "Remaining budget for api key: max_budget - spend in the current window (+Inf: unlimited)",
        KEY_LABELS,
    )
    key_max = _family(
        "litellm_api_key_max_budget_metric", "Maximum budget set for api key", KEY_LABELS
    )
    key_hours = _family(
        "litellm_api_key_budget_remaining_hours_metric",
        "Hours until the api key's budget resets (budget_reset_at)",
        KEY_LABELS,
    )
    for budget in snap.keys:
        _budget_values(budget, snap.now, key_remaining, key_max, key_hours)
    drift = _family(
        "budgetd_counter_drift_usd",
        "|counter - ledger sum| of a team's spend in the current window, when not zero "
        "(Redis and the ledger disagree; a settle in flight can show for one scrape)",
        ("team_id",),
    )
    for team_id, nanos in sorted(snap.drift.items()):
        drift.add_metric((team_id,), nanos_to_usd(nanos))
    yield from (team_remaining, team_max, team_hours, holds)
    yield from (key_remaining, key_max, key_hours, drift)
    yield _gauge(
        "budgetd_counter_drift_checked_teams",
        "Teams whose counter was compared with the ledger in this scrape",
        snap.drift_checked,
    )
    yield _gauge(
        "budgetd_budget_listing_truncated",
        f"1 when there were more than {MAX_TEAMS} teams or {MAX_KEYS} keys to report",
        1 if snap.truncated else 0,
    )


def _budget_values(
    budget: Budget,
    now: float,
    remaining: GaugeMetricFamily,
    maximum: GaugeMetricFamily,
    hours: GaugeMetricFamily,
) -> None:
    limit = budget.scope.limit_nanos
    if limit is None:
        remaining.add_metric(budget.labels, math.inf)
    else:
        # From exact nano-USD, so 1e-09 - 3.5e-06 is exactly -3.499e-06.
        remaining.add_metric(budget.labels, nanos_to_usd(limit - budget.state.spend))
        maximum.add_metric(budget.labels, nanos_to_usd(limit))
    end = budget.scope.window.end
    if end is not None:
        hours.add_metric(budget.labels, (end - now) / 3600)


def _family(name: str, documentation: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


async def _listing(
    page: Callable[[str, int], Awaitable[list[T]]], ident: Callable[[T], str], most: int
) -> tuple[list[T], bool]:
    """Up to ``most`` items, page by page; and whether there were more."""
    found: list[T] = []
    after = ""
    while True:
        batch = await page(after, PAGE)
        room = most - len(found)
        found.extend(batch[:room])
        if len(batch) > room:
            return found, True
        if len(batch) < PAGE:
            return found, False
        after = ident(batch[-1])


def _team_id(team: TeamRecord) -> str:
    return team.team_id


def _key_id(key: KeyRecord) -> str:
    return key.key_id


class SpendTotals:
    """``budgetd_spend_usd_total{team_id}``: spend this process applied, summed in exact
    nano-USD (a float counter would accumulate rounding), exposed as USD."""

    def __init__(self) -> None:
        self._nanos: dict[str, int] = {}

    def add(self, team_id: str, nanos: int) -> None:
        self._nanos[team_id] = self._nanos.get(team_id, 0) + nanos

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "budgetd_spend_usd",
            "USD recorded by RecordSpend (and Envoy's ext_proc) on this replica, per team",
            labels=["team_id"],
        )
        for team_id, nanos in sorted(self._nanos.items()):
            family.add_metric((team_id,), nanos_to_usd(nanos))
        yield family


def backend_of(error: BudgetdError) -> str:
    """Which backend an Unavailable names: postgres, redis, sqlite, or "counters"/"unknown"."""
    named = getattr(error, "backend", None)
    if isinstance(named, str) and named:
        return named
    text = str(error).lower()
    for backend in ("postgres", "redis", "sqlite"):
        if text.startswith(backend):
            return backend
    return "counters" if "counter" in text else "unknown"
