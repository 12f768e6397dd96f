"""The in-process queue: its bound, reservations and discards."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import QueueFull
from app.tasks.queue import MemoryQueue


async def test_bound_counts_reservations_and_waiting_tasks():
    queue = MemoryQueue(maxsize=2)
    first = queue.reserve()
    queue.reserve().commit("b")
    assert queue.depth() == 2
    with pytest.raises(QueueFull):
        queue.reserve()
    first.release()
    assert queue.depth() == 1
    queue.requeue("recovered")  # recovery is never refused, even past the bound
    assert queue.depth() == 2
    assert [await queue.get(), await queue.get()] == ["b", "recovered"]


async def test_discarded_tasks_free_their_slot_and_are_never_delivered():
    queue = MemoryQueue(maxsize=2)
    for task_id in ("a", "b"):
        queue.reserve().commit(task_id)
    assert queue.full()
    queue.discard("a")
    assert queue.depth() == 1
    assert not queue.full()
    assert await queue.get() == "b"
    queue.discard("b")  # already delivered: nothing changes
    assert queue.depth() == 0
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(queue.get(), timeout=0.05)
