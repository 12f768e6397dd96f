"""The task queue seam: an in-process bounded queue today, a shared one (Redis) later.

The queue holds task ids only; the truth about a task is its record in the store. The bound
applies to work waiting, not running, and is checked before anything is written: a submit first
takes a ``Reservation``, stores the task, then commits the reservation (or releases it on error).
Recovered tasks are put back unbounded: an accepted task is never refused after the fact.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from app.errors import QueueFull


class Reservation(Protocol):
    def commit(self, task_id: str) -> None:
        """Enqueue the task the slot was taken for."""

    def release(self) -> None:
        """Give the slot back without enqueuing anything."""


class TaskQueue(Protocol):
    """What workers and the task service need from a queue."""

    def reserve(self) -> Reservation:
        """Take a slot for a task about to be stored; raises ``QueueFull`` when none is left."""

    def requeue(self, task_id: str) -> None:
        """Put back a task accepted earlier (recovery after a restart); never refused."""

    async def get(self) -> str:
        """Wait for the next task id."""

    def ack(self, task_id: str) -> None:
        """The worker is done with ``task_id`` (whatever its outcome)."""

    def discard(self, task_id: str) -> None:
        """Drop a waiting task (canceled): it no longer counts toward the bound and is never delivered."""

    def depth(self) -> int:
        """Tasks waiting, reservations included."""

    def full(self) -> bool:
        """Whether ``reserve`` would refuse now."""


class _MemoryReservation:
    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue
        self._open = True

    def commit(self, task_id: str) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1
            self._queue.requeue(task_id)

    def release(self) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1


class MemoryQueue:
    """A FIFO of task ids in this process, bounded at ``maxsize`` waiting tasks.

    Redelivery is the recovery scan: ids lost with the process are found again from the records
    still ``queued`` or ``running`` when the service starts.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: asyncio.Queue[str] = asyncio.Queue()
        self._reserved = 0  # slots taken by submits that are still storing their task
        self._waiting: set[str] = set()  # ids in _items, to tell whether a discard concerns a waiting task
        self._discarded: set[str] = set()  # canceled while waiting; skipped by get()

    def full(self) -> bool:
        return self.depth() >= self.maxsize

    def reserve(self) -> _MemoryReservation:
        if self.full():
            raise QueueFull(f"the queue is full ({self.maxsize} tasks waiting)", retry_after=0)
        self._reserved += 1
        return _MemoryReservation(self)

    def requeue(self, task_id: str) -> None:
        self._waiting.add(task_id)
        self._items.put_nowait(task_id)

    async def get(self) -> str:
        while True:
            task_id = await self._items.get()
            self._waiting.discard(task_id)
            if task_id not in self._discarded:
                return task_id
            self._discarded.discard(task_id)
            self._items.task_done()

    def ack(self, task_id: str) -> None:
        self._items.task_done()

    def discard(self, task_id: str) -> None:
        if task_id in self._waiting:  # a task already handed to a worker is that worker's to skip
            self._discarded.add(task_id)

    def depth(self) -> int:
        return self._items.qsize() - len(self._discarded) + self._reserved
