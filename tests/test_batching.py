"""The group-commit batcher on its own (server/storage/batching.py), with a fake flush.

The fake flush records each batch it is given and can be held open on an event, so the
tests decide exactly which calls arrive while a flush is in flight; nothing here depends
on timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from server.storage.batching import Batcher


class Bad(Exception):
    """One item's own error."""


class Recorder:
    """A flush that records its batches, doubles each item and fails negative ones.

    While ``gate`` is clear every flush waits on it after recording its batch, so the test
    can pile calls up behind a flush in flight.
    """

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()  # set when a flush has recorded its batch
        self.raise_whole: Exception | None = None

    async def flush(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        if self.raise_whole is not None:
            raise self.raise_whole
        return [Bad(f"item {item}") if item < 0 else item * 2 for item in items]


async def settle() -> None:
    """Let every task that is ready run (a few loop iterations)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_call_made_while_idle_is_flushed_at_once_alone() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=2)
    assert await batcher.submit(21) == 42
    assert flush.batches == [[21]]
    assert (batcher.flushes, batcher.flushed_items, batcher.largest_batch) == (1, 1, 1)
    assert batcher.idle


async def test_calls_made_together_share_one_flush() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=2)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(50)))
    assert results == [i * 2 for i in range(50)]
    assert flush.batches == [list(range(50))]
    assert batcher.flushes == 1


async def test_calls_arriving_during_a_flush_go_together_in_the_next_one() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=1)
    flush.gate.clear()
    first = asyncio.create_task(batcher.submit(0))
    await flush.started.wait()  # the first flush is in flight, alone
    later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 31)]
    await settle()
    assert flush.batches == [[0]]  # the others wait for it
    flush.gate.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [i * 2 for i in range(1, 31)]
    assert flush.batches == [[0], list(range(1, 31))]
    assert batcher.flushes == 2


async def test_no_more_flushes_run_at_once_than_allowed() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=2)
    flush.gate.clear()
    calls = [asyncio.create_task(batcher.submit(0))]
    await settle()
    calls.append(asyncio.create_task(batcher.submit(1)))  # a second flush may start
    await settle()
    calls += [asyncio.create_task(batcher.submit(i)) for i in range(2, 10)]
    await settle()
    assert flush.batches == [[0], [1]]  # two in flight; the rest wait for one to finish
    flush.gate.set()
    assert await asyncio.gather(*calls) == [i * 2 for i in range(10)]
    assert flush.batches == [[0], [1], list(range(2, 10))]


async def test_a_batch_never_holds_more_than_max_batch_items() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_batch=8, max_in_flight=1)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(30)))
    assert results == [i * 2 for i in range(30)]
    assert [len(batch) for batch in flush.batches] == [8, 8, 8, 6]
    assert [item for batch in flush.batches for item in batch] == list(range(30))  # in order
    assert batcher.largest_batch == 8


async def test_an_item_error_goes_to_its_caller_alone() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush)
    results = await asyncio.gather(*(batcher.submit(i) for i in (1, -2, 3)), return_exceptions=True)
    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], Bad) and str(results[1]) == "item -2"
    assert flush.batches == [[1, -2, 3]]


async def test_an_error_raised_by_the_flush_goes_to_every_caller_of_the_batch() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush)
    flush.raise_whole = ConnectionError("down")
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    flush.raise_whole = None  # and the batcher still works afterwards
    assert await batcher.submit(4) == 8


async def test_a_flush_answering_the_wrong_number_of_results_fails_its_batch() -> None:
    async def short(items: list[int]) -> Sequence[int | BaseException]:
        return items[:-1]

    batcher = Batcher(short)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_equal_items_in_one_batch_are_each_passed_and_answered_in_order() -> None:
    """Duplicate keys: the flush sees every call, in order, and decides (as Postgres does:
    the first is inserted, the later ones are answered as duplicates)."""
    seen: list[list[str]] = []

    async def first_wins(items: list[str]) -> Sequence[str | BaseException]:
        seen.append(list(items))
        answered: set[str] = set()
        out = []
        for item in items:
            out.append(f"{item}:{'duplicate' if item in answered else 'new'}")
            answered.add(item)
        return out

    batcher = Batcher(first_wins)
    results = await asyncio.gather(*(batcher.submit(key) for key in ("a", "b", "a", "a")))
    assert results == ["a:new", "b:new", "a:duplicate", "a:duplicate"]
    assert seen == [["a", "b", "a", "a"]]


async def test_a_cancelled_caller_does_not_disturb_the_flush_that_carries_it() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=1)
    flush.gate.clear()
    calls = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await flush.started.wait()
    calls[2].cancel()
    await settle()
    assert calls[2].cancelled()
    flush.gate.set()
    assert [await calls[i] for i in (0, 1, 3, 4)] == [0, 2, 6, 8]
    assert flush.batches == [[0, 1, 2, 3, 4]]  # it was carried: its row may commit
    assert batcher.idle


async def test_a_caller_cancelled_before_any_flush_takes_it_is_not_flushed() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=1)
    flush.gate.clear()
    first = asyncio.create_task(batcher.submit(0))
    await flush.started.wait()
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await settle()
    queued[1].cancel()
    await settle()
    flush.gate.set()
    assert await first == 0
    assert [await queued[0], await queued[2]] == [2, 6]
    assert flush.batches == [[0], [1, 3]]


async def test_drain_waits_for_queued_and_running_flushes() -> None:
    flush = Recorder()
    batcher = Batcher(flush.flush, max_in_flight=1)
    flush.gate.clear()
    calls = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await flush.started.wait()
    calls.append(asyncio.create_task(batcher.submit(3)))
    await settle()
    drained = asyncio.create_task(batcher.drain())
    await settle()
    assert not drained.done()
    flush.gate.set()
    await drained
    assert batcher.idle
    assert all(call.done() for call in calls)
    assert [call.result() for call in calls] == [0, 2, 4, 6]


async def test_drain_of_an_idle_batcher_returns_at_once() -> None:
    batcher = Batcher(Recorder().flush)
    await batcher.drain()
    assert batcher.idle


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Batcher(Recorder().flush, max_batch=0)
    with pytest.raises(ValueError):
        Batcher(Recorder().flush, max_in_flight=0)
