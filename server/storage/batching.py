"""Group commit for asyncio: calls that arrive while a flush is in flight share the next one.

A :class:`Batcher` turns many concurrent ``await batcher.submit(item)`` calls into few calls
of one ``flush(items)`` function (for the ledger: one multi-row ``INSERT`` and one commit for
many ``RecordSpend`` calls). It never waits on a timer, so it adds no latency when idle: a
call that finds no flush running starts one at once, alone. Calls that arrive while every
allowed flush is running queue up and go together in the next flush, so the batches grow
exactly as fast as the load does ("natural batching").

Each caller gets its own item's answer, and only once the flush that carried it has
returned (for the ledger: after the commit). A caller that is cancelled stops waiting but
does not disturb the flush: its item is dropped if no flush has taken it yet, and otherwise
goes with the others (its answer is discarded).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeAlias, TypeVar, runtime_checkable


class BatchCounts(NamedTuple):
    """What a batching path has sent so far: its round trips to the store, and the calls
    they carried (calls / round trips is its mean batch)."""

    round_trips: int
    calls: int


@runtime_checkable
class Batching(Protocol):
    """A store that batches concurrent calls and can say how well (the batching metrics)."""

    def batch_counts(self) -> BatchCounts | None:
        """Its counts so far, or None while it has no batching path (not started, a
        Redis Cluster)."""
        ...


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")

# A waiting caller: its item and the future its answer is delivered on.
_Waiter: TypeAlias = tuple[_Item, asyncio.Future[_Result]]


class Batcher(Generic[_Item, _Result]):
    """Coalesce concurrent :meth:`submit` calls into calls of ``flush``.

    ``flush(items)`` returns one entry per item, in the same order: that item's result, or
    an exception instance to raise to that item's caller alone (so ``_Result`` must not
    itself be an exception type). An exception *raised* by ``flush`` goes to every caller of
    the batch. At most ``max_in_flight`` flushes run at once, each with at most
    ``max_batch`` items, in the order the items were submitted.

    The counters ``flushes``, ``flushed_items`` and ``largest_batch`` are for tests and
    metrics; they are only ever increased.
    """

    def __init__(
        self,
        flush: Callable[[list[_Item]], Awaitable[Sequence[_Result | BaseException]]],
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._flush = flush
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: deque[_Waiter[_Item, _Result]] = deque()
        # Workers running or about to run. Counted separately from the task set, and
        # decreased by the worker itself in the same step in which it finds nothing left
        # to do: a task's done callback runs a loop iteration later, and a submit in
        # between must not believe a worker is still coming for its item.
        self._running = 0
        self._workers: set[asyncio.Task[None]] = set()  # strong references, and drain()
        self.flushes = 0
        self.flushed_items = 0
        self.largest_batch = 0

    def counts(self) -> BatchCounts:
        """Flushes so far, and the items they carried."""
        return BatchCounts(self.flushes, self.flushed_items)

    @property
    def idle(self) -> bool:
        """True when nothing is queued and no flush is running."""
        return self._running == 0 and not self._pending

    async def submit(self, item: _Item) -> _Result:
        """``item``'s answer from the flush that carries it (its exception is raised here)."""
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._running < self._max_in_flight:
            # The worker takes its batch when it first runs, one loop iteration from now,
            # so calls made in this same iteration (an asyncio.gather) share its flush.
            self._running += 1
            task = asyncio.create_task(self._work(), name="batcher-flush")
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)
        # A cancelled caller cancels only its own future: the worker skips it.
        return await future

    async def drain(self) -> None:
        """Wait until every submitted item (including any submitted meanwhile) is answered."""
        while self._workers:
            # asyncio.wait, unlike gather, does not cancel the workers if drain() is.
            await asyncio.wait(list(self._workers))

    async def _work(self) -> None:
        """Flush batches until none is waiting (at most ``max_in_flight`` of these run)."""
        try:
            while batch := self._take():
                await self._run(batch)
        except asyncio.CancelledError:
            # Only the loop shutting down cancels a worker. If it was the last one, no
            # worker is left to serve the queue: end those waits too, rather than hang.
            if self._running == 1:
                while self._pending:
                    self._pending.popleft()[1].cancel()
            raise
        finally:
            self._running -= 1

    def _take(self) -> list[_Waiter[_Item, _Result]]:
        """The next batch, oldest first, without the callers that have stopped waiting."""
        batch: list[_Waiter[_Item, _Result]] = []
        while self._pending and len(batch) < self._max_batch:
            waiter = self._pending.popleft()
            if not waiter[1].done():  # cancelled before any flush took it: not flushed
                batch.append(waiter)
        return batch

    async def _run(self, batch: list[_Waiter[_Item, _Result]]) -> None:
        """One flush of ``batch``, its answers delivered to the callers still waiting."""
        self.flushes += 1
        self.flushed_items += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            results = await self._flush([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"flush answered {len(results)} results for a batch of {len(batch)}"
                )
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the whole batch failed: every caller in it is told
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile: nobody to tell
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
