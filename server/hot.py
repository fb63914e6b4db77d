"""Hot answers: a busy key's CheckBudget decided from what its last full decision worked out.

A full decision resolves the key to its team and member (three record-cache reads), builds
the scopes and windows the request counts against, derives the lease's scope set, and puts
the answer together. For a key asking many times a second, while this replica holds a lease
of those scopes' headroom (:mod:`server.storage.leasing`), all of that comes out the same
every time. A :class:`HotEntry` remembers it, so the hot path only does what differs per
request: the estimate, the reservation id, and the admission against the lease.

An entry is used only while everything it was derived from still holds:

* the records it came from are fresh in the record cache: younger than the cache's TTL and
  no write through this replica since (:meth:`CachedRecords.freshness`), so a revoked key,
  a blocked team or a new budget takes effect exactly when it does on the full path;
* ``now`` is inside every scope's window and before the key's expiry;
* the lease admits the request (it has room and time); otherwise the full path decides,
  asking the store, and refreshes the entry.

Denials and rate-limited requests always take the full path (entries exist only for scope
sets without rate limits). So the hot path gives exactly the answers the full path would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from server.decision import Decision
from server.scopes import Principal
from server.storage.base import CounterState, ScopeBudget
from server.storage.cached_records import Freshness
from server.storage.lease import Lease

# Entries are small (a few hundred bytes); past this many the oldest is forgotten.
MAX_ENTRIES = 10_000

# (API key, model, user_id as the request gave it). The key itself, not its SHA-256: a
# hash per request costs more than the rest of the lookup. Only this process's memory holds
# it, as it holds every request in flight; the databases still see hashes only.
HotKey = tuple[str, str, str]


# A request's sizing and what it came to: (estimated_cost, max_tokens, prompt_tokens) as
# sent, then the estimate (nano-USD) and the tokens charged to tpm limits.
Sizing = tuple[float | None, int | None, int | None, int, int]


@dataclass(slots=True)
class HotEntry:
    """What a full decision of one (key, model, user) worked out, and while it holds."""

    who: Principal
    scopes: list[ScopeBudget]
    lease: Lease  # the lease this replica admits the scope set from (while it is live)
    freshness: Freshness
    opens: float  # the latest window start: valid from here ...
    closes: float  # ... to the earliest window end or the key's expiry
    prefix: str  # the start of each reservation id (ReservationCodec.prefix)
    # The answer's shape for the lease states it was built from (a new lease, a new shape).
    states: Sequence[CounterState] | None = None
    template: Decision | None = None
    # The last request's sizing, validated and priced: clients send the same one again and
    # again, and an equal one comes to the same (the prices are fixed, the model is the key's).
    sizing: Sizing | None = None


class HotAllow(NamedTuple):
    """A hot-path allow: its entry's template with this request's reservation and hold.

    What the faces convert (each keeps the template's wire form in its ``forms``); as a
    Decision it is ``answers.admitted(*allow)``.
    """

    template: Decision
    reservation_id: str
    reserved_nanos: int


class HotAnswers:
    """A bounded map from (API key, model, user) to its :class:`HotEntry`."""

    def __init__(self, capacity: int = MAX_ENTRIES) -> None:
        self._entries: dict[HotKey, HotEntry] = {}
        self._capacity = capacity
        # The entry of a key, or None: the dict's own get, with no Python call around it
        # (every hot request looks its entry up).
        self.get: Callable[[HotKey], HotEntry | None] = self._entries.get

    def remember(
        self,
        key: HotKey,
        who: Principal,
        scopes: list[ScopeBudget],
        lease: Lease,
        freshness: Freshness,
        prefix: str,
    ) -> None:
        """Keep what a full decision derived, for the next requests of the same key."""
        opens = float(max(scope.window.start for scope in scopes))
        ends = [float(s.window.end) for s in scopes if s.window.end is not None]
        if who.key is not None and who.key.expires_at is not None:
            ends.append(who.key.expires_at)
        closes = min(ends, default=float("inf"))
        self._entries.pop(key, None)
        self._entries[key] = HotEntry(who, scopes, lease, freshness, opens, closes, prefix)
        if len(self._entries) > self._capacity:
            del self._entries[next(iter(self._entries))]  # the oldest

    def __len__(self) -> int:
        return len(self._entries)
