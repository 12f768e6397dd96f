"""The task queue seam: an in-process bounded queue today, a shared one (Redis) later.

The queue holds task ids only; the truth about a task is its record in the store. ``MemoryQueue``
is the one-process queue; ``app.tasks.redis_queue.RedisQueue`` is shared by API replicas and
workers on several machines. The bound
applies to work waiting, not running, and is checked before anything is written: a submit first
takes a ``Reservation``, stores the task, then commits the reservation (or releases it on error).
Recovered tasks are put back unbounded: an accepted task is never refused after the fact.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from app.errors import QueueFull


class Reservation(Protocol):
    async def commit(self, task_id: str) -> None:
        """Enqueue the task the slot was taken for."""

    async def release(self) -> None:
        """Give the slot back without enqueuing anything."""


class TaskQueue(Protocol):
    """What workers and the task service need from a queue.

    Delivery is at least once: a task handed to a worker stays that worker's while it renews its
    lease (``touch``); a task whose worker stopped renewing is delivered again. Workers make the
    outcome exactly-once with the record's lease (``app.storage.base``).
    """

    durable: bool  # True: the queue outlives processes and redelivers; False: recovery re-queues

    async def reserve(self) -> Reservation:
        """Take a slot for a task about to be stored; raises ``QueueFull`` when none is left."""

    async def requeue(self, task_id: str) -> None:
        """Put back a task accepted earlier (recovery, a shutdown mid-task); never refused."""

    async def get(self) -> str:
        """Wait for the next task id."""

    async def touch(self, task_id: str) -> bool:
        """Renew this worker's hold on a task it was given; ``False`` when another worker has it."""

    async def ack(self, task_id: str) -> None:
        """This worker is done with ``task_id`` (whatever its outcome); it is never delivered again."""

    def forget(self, task_id: str) -> None:
        """Let go of a task without acknowledging it (another worker took it over): it stays due."""

    async def discard(self, task_id: str) -> None:
        """Drop a waiting task (canceled): it no longer counts toward the bound."""

    async def position(self, task_id: str) -> int | None:
        """Where a waiting task is in the queue (1: the next to start); ``None`` when it is not waiting."""

    async def depth(self) -> int:
        """Tasks waiting, reservations included."""

    async def oldest_age(self) -> float:
        """Seconds the longest-waiting task has waited; 0 when none waits."""

    async def full(self) -> bool:
        """Whether ``reserve`` would refuse now."""


class _MemoryReservation:
    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue
        self._open = True

    async def commit(self, task_id: str) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1
            await self._queue.requeue(task_id)

    async def release(self) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1


class MemoryQueue:
    """A FIFO of task ids in this process, bounded at ``maxsize`` waiting tasks.

    Redelivery is the recovery scan: ids lost with the process are found again from the records
    still ``queued`` or ``running`` when the service starts.
    """

    durable = False

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: asyncio.Queue[str] = asyncio.Queue()
        self._reserved = 0  # slots taken by submits that are still storing their task
        self._waiting: dict[str, float] = {}  # ids in _items -> when they were queued (monotonic)
        self._discarded: set[str] = set()  # canceled while waiting; skipped by get()

    async def full(self) -> bool:
        return await self.depth() >= self.maxsize

    async def reserve(self) -> _MemoryReservation:
        if await self.full():
            raise QueueFull(f"the queue is full ({self.maxsize} tasks waiting)", retry_after=0)
        self._reserved += 1
        return _MemoryReservation(self)

    async def requeue(self, task_id: str) -> None:
        self._waiting[task_id] = time.monotonic()
        self._items.put_nowait(task_id)

    async def get(self) -> str:
        while True:
            task_id = await self._items.get()
            self._waiting.pop(task_id, None)
            if task_id not in self._discarded:
                return task_id
            self._discarded.discard(task_id)
            self._items.task_done()

    async def touch(self, task_id: str) -> bool:
        return True  # one process: nobody else can take it

    async def ack(self, task_id: str) -> None:
        self._items.task_done()

    def forget(self, task_id: str) -> None:
        self._items.task_done()  # never happens with one process; kept so the counts stay right

    async def discard(self, task_id: str) -> None:
        if self._waiting.pop(task_id, None) is not None:  # a task handed to a worker is its to skip
            self._discarded.add(task_id)

    async def position(self, task_id: str) -> int | None:
        if task_id not in self._waiting:
            return None
        return list(self._waiting).index(task_id) + 1  # insertion order is queue order

    async def depth(self) -> int:
        return self._items.qsize() - len(self._discarded) + self._reserved

    async def oldest_age(self) -> float:
        return time.monotonic() - min(self._waiting.values()) if self._waiting else 0.0
