"""Ledger snapshots: did the sum that built a counter already see a given ledger row?

A counter rebuilt from the ledger stores the Postgres snapshot (``pg_current_snapshot()``,
text ``xmin:xmax:xip1,xip2,...``) of the statement that summed it. Each ledger row carries
the id of the transaction that wrote it (``xact``). The row is in the sum exactly when its
transaction is visible in the snapshot, by Postgres' own rule: committed before ``xmin``, or
below ``xmax`` and not among the in-progress ``xip`` ids. (Only committed rows are ever
settled, so "visible" and "in the sum" coincide.)

``common.lua`` implements the same rule for Redis, on decimal strings; the counter contract
tests run both.
"""

from __future__ import annotations


def visible(xact: int | None, snapshot: str | None) -> bool:
    """Whether transaction ``xact`` is visible in ``snapshot`` (False if either is None)."""
    if xact is None or not snapshot:
        return False
    xmin_text, xmax_text, xip_text = snapshot.split(":", 2)
    if xact < int(xmin_text):
        return True
    if xact >= int(xmax_text):
        return False
    return str(xact) not in xip_text.split(",")


def snapshot_of(xmin: int, xmax: int, in_progress: tuple[int, ...] = ()) -> str:
    """A snapshot in Postgres' text form (for tests and the in-process store)."""
    return f"{xmin}:{xmax}:{','.join(str(x) for x in in_progress)}"
