"""The task queue seam: an in-process bounded queue, or a shared one (Redis), both fair to tenants.

The queue holds task ids only; the truth about a task is its record in the store. ``MemoryQueue``
is the one-process queue; ``app.tasks.redis_queue.RedisQueue`` is shared by API replicas and
workers on several machines. The bound applies to work waiting, not running, and is checked before
anything is written: a submit first takes a ``Reservation``, stores the task, then commits the
reservation (or releases it on error). Recovered tasks are put back unbounded: an accepted task is
never refused after the fact.

Fair share. Each tenant (``app.tenants``; tasks without one, with auth off, are one tenant) has a
line of its waiting tasks, interactive ones before batch ones, each kind in arrival order. Workers
take tasks round-robin across the tenants with waiting tasks, weighted: the tenants take *turns*
in a ring, and a turn is ``weight`` starts (or fewer, when the line runs out). A tenant whose line
runs empty leaves the ring; one whose line fills again joins at its end. The tenant whose turn has
just ended stays at the head until the next start, which moves it to the end, behind any newcomer:
so with tenant A alone and 50 tasks deep, a task tenant B submits starts once A's turn is over,
after at most ``weight(A)`` more of A's (at weight 1: at once if one of A's has started since it
was A's turn, else after one). A tenant holding ``running_limit`` tasks (handed to workers, not yet
acknowledged) is passed over, its turn forfeited, until one of them ends. Both queues apply this
same rule (the Redis one in a script), so tests hold them to the same schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from app.errors import QueueFull
from app.records import Priority
from app.tenants import Tenants

NO_TENANT = "-"  # the line of tasks without a tenant; no tenant name can take it (app.tenants._Name)
BANDS: dict[Priority, int] = {"interactive": 0, "batch": 1}  # a line's order: lower bands first


def line_of(tenant: str | None) -> str:
    """The name of the line ``tenant``'s tasks wait in."""
    return NO_TENANT if tenant is None else tenant


def tenant_of(line: str) -> str | None:
    return None if line == NO_TENANT else line


class Shares(Protocol):
    """How the workers are shared among tenants; read at every start, so a reload applies at once."""

    def weight(self, tenant: str | None) -> int:
        """Starts per turn (>= 1); 1 for a tenant it does not know."""

    def running_limit(self, tenant: str | None) -> int | None:
        """The most tasks the tenant may hold at once; ``None``: no limit of its own."""

    def names(self) -> Iterable[str]:
        """Every tenant whose weight or limit may differ from the default (1, none)."""


class EqualShares:
    """Every tenant weight 1, none limited: plain round robin (and FIFO with one tenant)."""

    def weight(self, tenant: str | None) -> int:
        return 1

    def running_limit(self, tenant: str | None) -> int | None:
        return None

    def names(self) -> Iterable[str]:
        return ()


@dataclass(frozen=True)
class TenantShares:
    """``Shares`` from the tenants registry: ``weight`` and ``limits.running_tasks``."""

    tenants: Tenants

    def weight(self, tenant: str | None) -> int:
        return self.tenants.weight(tenant)

    def running_limit(self, tenant: str | None) -> int | None:
        found = self.tenants.get(tenant) if tenant is not None else None
        return found.limits.running_tasks if found is not None else None

    def names(self) -> Iterable[str]:
        return self.tenants.names()


class Reservation(Protocol):
    async def commit(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        """Enqueue the task the slot was taken for, in ``tenant``'s line at ``priority``."""

    async def release(self) -> None:
        """Give the slot back without enqueuing anything."""


class TaskQueue(Protocol):
    """What workers and the task service need from a queue.

    Delivery is at least once: a task handed to a worker stays that worker's while it renews its
    lease (``touch``); a task whose worker stopped renewing is delivered again. Workers make the
    outcome exactly-once with the record's lease (``app.storage.base``). Which waiting task is
    delivered next is the fair-share rule of this module's docstring.
    """

    durable: bool  # True: the queue outlives processes and redelivers; False: recovery re-queues

    async def reserve(self) -> Reservation:
        """Take a slot for a task about to be stored; raises ``QueueFull`` when none is left."""

    async def requeue(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        """Put back a task accepted earlier (recovery, a shutdown mid-task); never refused. A
        worker holding it holds it no longer."""

    async def get(self) -> str:
        """Wait for the next task id (fair share), and hold it for this worker."""

    async def touch(self, task_id: str) -> bool:
        """Renew this worker's hold on a task it was given; ``False`` when another worker has it."""

    async def ack(self, task_id: str) -> None:
        """This worker is done with ``task_id`` (whatever its outcome); it is never delivered again
        and no longer counts toward its tenant's running limit."""

    def forget(self, task_id: str) -> None:
        """Let go of a task without acknowledging it (another worker took it over): it stays due."""

    async def discard(self, task_id: str) -> None:
        """Drop a waiting task (canceled): it no longer counts toward the bound."""

    async def position(self, task_id: str) -> int | None:
        """Where a waiting task is in the schedule (1: the next to start), if nothing arrived and no
        tenant were held at its running limit; ``None`` when it is not waiting."""

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

    async def commit(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1
            await self._queue.requeue(task_id, tenant=tenant, priority=priority)

    async def release(self) -> None:
        if self._open:
            self._open = False
            self._queue._reserved -= 1


@dataclass(frozen=True)
class _Waiting:
    line: str
    band: int
    since: float  # monotonic


class MemoryQueue:
    """The fair-share queue of this process, bounded at ``maxsize`` waiting tasks.

    Redelivery is the recovery scan: ids lost with the process are found again from the records
    still ``queued`` or ``running`` when the service starts.
    """

    durable = False

    def __init__(self, maxsize: int, shares: Shares | None = None) -> None:
        self.maxsize = maxsize
        self._shares = shares or EqualShares()
        self._reserved = 0  # slots taken by submits that are still storing their task
        self._waiting: dict[str, _Waiting] = {}  # in arrival order
        self._lines: dict[str, tuple[dict[str, None], ...]] = {}  # line -> its bands, ids in order
        self._ring: deque[str] = deque()  # lines with waiting tasks, the one taking its turn first
        self._turn: tuple[str | None, int] = (None, 0)  # the line whose turn it is, starts made
        self._held: dict[str, str] = {}  # task id -> line, from delivery until ack or forget
        self._changed = asyncio.Event()  # set when a task may have become deliverable

    async def full(self) -> bool:
        return await self.depth() >= self.maxsize

    async def reserve(self) -> _MemoryReservation:
        if await self.full():
            raise QueueFull(f"the queue is full ({self.maxsize} tasks waiting)", retry_after=0)
        self._reserved += 1
        return _MemoryReservation(self)

    async def requeue(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        self._release(task_id)
        if task_id in self._waiting:
            return
        line = line_of(tenant)
        if line not in self._lines:
            self._lines[line] = tuple({} for _ in BANDS)
            self._ring.append(line)
        self._lines[line][BANDS[priority]][task_id] = None
        self._waiting[task_id] = _Waiting(line, BANDS[priority], time.monotonic())
        self._changed.set()

    async def get(self) -> str:
        while True:
            task_id = self._take()
            if task_id is not None:
                return task_id
            # No await between the look and the clear: nothing can change in between.
            self._changed.clear()
            await self._changed.wait()

    def _take(self) -> str | None:
        """The fair-share rule (the module's docstring; ``RedisQueue``'s script is the same)."""
        blocked = 0
        for _ in range(len(self._ring) + 1):  # the head whose turn is over comes round last
            if blocked >= len(self._ring):
                return None
            line = self._ring[0]
            turn_line, used = self._turn
            if turn_line != line:
                used = 0
            limit = self._shares.running_limit(tenant_of(line))
            at_limit = limit is not None and sum(1 for held in self._held.values() if held == line) >= limit
            if not at_limit and used < self._shares.weight(tenant_of(line)):
                self._turn = (line, used + 1)
                return self._deliver(line)
            blocked += at_limit
            self._ring.rotate(-1)
            self._turn = (None, 0)
        return None

    def _deliver(self, line: str) -> str:
        bands = self._lines[line]
        band = next(b for b in bands if b)
        task_id = next(iter(band))
        del band[task_id]
        del self._waiting[task_id]
        if not any(bands):
            del self._lines[line]
            self._ring.popleft()
        self._held[task_id] = line
        return task_id

    def _release(self, task_id: str) -> None:
        if self._held.pop(task_id, None) is not None:
            self._changed.set()  # its tenant may be under its running limit again

    async def touch(self, task_id: str) -> bool:
        return True  # one process: nobody else can take it

    async def ack(self, task_id: str) -> None:
        self._release(task_id)

    def forget(self, task_id: str) -> None:
        self._release(task_id)  # never happens with one process; kept so the limits stay right

    async def discard(self, task_id: str) -> None:
        waiting = self._waiting.pop(task_id, None)
        if waiting is None:
            return  # a task handed to a worker is its to skip
        bands = self._lines[waiting.line]
        del bands[waiting.band][task_id]
        if not any(bands):
            del self._lines[waiting.line]
            self._ring.remove(waiting.line)

    async def position(self, task_id: str) -> int | None:
        if task_id not in self._waiting:
            return None
        return self._schedule().index(task_id) + 1

    def ahead(self, task_id: str) -> list[str] | None:
        """The tasks that start before the waiting ``task_id`` (for start estimates): those handed
        to workers already (running, or about to), then the waiting ones the schedule starts first;
        ``None`` when it is not waiting."""
        if task_id not in self._waiting:
            return None
        order = self._schedule()
        return [*self._held, *order[: order.index(task_id)]]

    def _schedule(self) -> list[str]:
        """Every waiting task in the order ``_take`` would start them if nothing arrived and no
        tenant were held at its running limit (``_take`` on a copy, limits left out)."""
        ring = deque(self._ring)
        turn_line, used = self._turn
        lines = {line: deque(t for band in bands for t in band) for line, bands in self._lines.items()}
        order: list[str] = []
        while ring:
            line = ring[0]
            if turn_line != line:
                turn_line, used = line, 0
            if used < self._shares.weight(tenant_of(line)):
                order.append(lines[line].popleft())
                used += 1
                if not lines[line]:
                    ring.popleft()
            else:
                ring.rotate(-1)
                turn_line = None
        return order

    async def depth(self) -> int:
        return len(self._waiting) + self._reserved

    async def oldest_age(self) -> float:
        return time.monotonic() - min(w.since for w in self._waiting.values()) if self._waiting else 0.0
