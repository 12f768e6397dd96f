"""The in-process queue: its bound, reservations and discards."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import QueueFull
from app.tasks.queue import MemoryQueue


async def test_bound_counts_reservations_and_waiting_tasks():
    queue = MemoryQueue(maxsize=2)
    first = await queue.reserve()
    await (await queue.reserve()).commit("b", tenant=None, priority="interactive")
    assert await queue.depth() == 2
    with pytest.raises(QueueFull):
        (await queue.reserve())
    await first.release()
    assert await queue.depth() == 1
    # Recovery is never refused, even past the bound.
    await queue.requeue("recovered", tenant=None, priority="interactive")
    assert await queue.depth() == 2
    assert [await queue.position("b"), await queue.position("recovered")] == [1, 2]
    assert [await queue.get(), await queue.get()] == ["b", "recovered"]


async def test_discarded_tasks_free_their_slot_and_are_never_delivered():
    queue = MemoryQueue(maxsize=2)
    for task_id in ("a", "b"):
        await (await queue.reserve()).commit(task_id, tenant=None, priority="interactive")
    assert await queue.full()
    await queue.discard("a")
    assert await queue.depth() == 1
    assert not await queue.full()
    assert await queue.get() == "b"
    await queue.discard("b")  # already delivered: nothing changes
    assert await queue.depth() == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), timeout=0.05)
