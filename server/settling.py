"""Settling ledger rows whose own settle never happened: crash recovery and spool replay.

A RecordSpend writes its ledger row, then settles its cost into the counters. Two things can
come between the two, and both leave the counters short of the ledger for good unless
someone settles the row later:

* budgetd dies after the commit (kill -9, OOM, a lost node). The request was announced to
  the counter store before its ledger insert (``CounterStore.begin_settle``); once its settle
  is overdue the store hands its request id to the team's next ``reserve`` or ``settle``
  caller (``unsettled``), and :meth:`Settler.recover` settles it from the ledger row, or
  forgets it when the row never got written;
* Postgres is down: the row is spooled and settled at once, and written to the ledger only
  at replay; :meth:`Settler.settle_row` runs for each replayed row, which matters when
  budgetd died between the spool's fsync and that settle.

Either way the settle is the ordinary one, so it is exactly-once: the counters' dedupe marker
turns a second settle of the same request into a no-op (the request was only slow), and the
ledger transaction id keeps a counter rebuilt since, whose sum already has the row, from
adding it again.
"""

from __future__ import annotations

import logging
from datetime import tzinfo

from server.clock import Clock
from server.errors import BudgetdError
from server.principals import Principals
from server.scopes import request_scopes
from server.storage.base import CounterStore, LedgerEntry, LedgerInsert, RecordStore

log = logging.getLogger("budgetd.settling")

# A settle counts as done this long after a RecordSpend was admitted to the ledger; the
# counters' dedupe markers (and so exactly-once settles) last as long.
DEDUPE_TTL = 86_400.0
# A RecordSpend whose settle has not come this long after its ledger insert began is
# presumed dead (capped by reservation_ttl). Too short is harmless: settling a request that
# was only slow is a no-op, and forgetting one not yet in the ledger leaves its own settle.
MAX_SETTLE_GRACE = 30.0


class Settler:
    """Settles ledger rows into the counters on behalf of requests that could not."""

    def __init__(
        self,
        records: RecordStore,
        counters: CounterStore,
        clock: Clock,
        tz: tzinfo,
        principals: Principals | None = None,
    ) -> None:
        self._principals = principals if principals is not None else Principals(records)
        self._records = records
        self._counters = counters
        self._clock = clock
        self._tz = tz

    async def settle_row(self, entry: LedgerEntry, stored: LedgerInsert) -> None:
        """Settle one ledger row (a no-op when its request already settled it)."""
        unsettled = await self._settle_row(entry, stored)
        if unsettled:
            await self.recover(entry.team_id, unsettled)

    async def _settle_row(self, entry: LedgerEntry, stored: LedgerInsert) -> tuple[str, ...]:
        who = await self._principals.for_spend(entry.team_id, entry.key_id, entry.user_id)
        if who is None:
            return ()  # gone since: nothing decides on its counters any more
        scopes = request_scopes(who, entry.admitted_at, self._tz, entry.model)
        settled = await self._counters.settle(
            entry.team_id, entry.reservation_id, scopes, entry.cost_nanos, entry.request_id,
            self._clock.now(), DEDUPE_TTL, xact=stored.xact,
        )  # fmt: skip
        return settled.unsettled

    async def recover(self, team_id: str, unsettled: tuple[str, ...]) -> None:
        """Settle (or forget) overdue requests the counter store handed over.

        Settling one may hand over more (each settle claims what is overdue): they are
        recovered in the same loop. A failure (Postgres down) is logged; the request is
        handed over again once the store's claim on it runs out.
        """
        queue = list(unsettled)
        while queue:
            request_id = queue.pop()
            try:
                found = await self._records.get_spend(request_id)
                now = self._clock.now()
                # No row: it never reached the ledger. An old row: settled long ago, and its
                # dedupe marker may be gone, so settling it again could count it twice.
                if (
                    found is None
                    or found.entry.team_id != team_id
                    or now - found.entry.recorded_at >= DEDUPE_TTL
                ):
                    await self._counters.abandon_settle(team_id, request_id, now)
                    continue
                log.warning(
                    "request %r of team %s was written to the ledger but never settled (its "
                    "budgetd died?): settling it now",
                    request_id, team_id,
                )  # fmt: skip
                queue += await self._settle_row(found.entry, found)
            except BudgetdError as exc:
                log.warning("recovering request %r of team %s failed: %s", request_id, team_id, exc)
