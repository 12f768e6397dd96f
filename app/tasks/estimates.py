"""Queue positions and start/end estimates for queued tasks, from measured seconds per page.

The queue holds task ids only (``queue.py``), so the task service keeps this board beside it: every
task waiting or running in this process, with its pages. A queued task's start is estimated from
the pages still to do ahead of it (the rest of the running tasks, and the queued tasks the queue's
fair-share schedule starts before it) shared among the workers; its end adds its own pages.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from app.records import QueueEstimate

SMOOTHING = 0.1  # weight of the newest page in the moving average of seconds per page


@dataclass
class _Entry:
    pages_total: int
    pages_done: int = 0
    running: bool = False
    last_page_at: float | None = None  # monotonic time of this task's latest recognised page


class QueueBoard:
    """Tasks waiting or running in this process, and the measured seconds per page.

    Not thread-safe: called from the event loop (and from ``recover`` before the loop serves).
    """

    def __init__(self, *, workers: int) -> None:
        self._workers = workers
        self._entries: dict[str, _Entry] = {}
        self.seconds_per_page: float | None = None  # None until a page was timed

    def queued(self, task_id: str, pages_total: int) -> None:
        """The task joined the queue."""
        self._entries[task_id] = _Entry(pages_total)

    def started(self, task_id: str) -> None:
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.running, entry.pages_done, entry.last_page_at = True, 0, None

    def page_done(self, task_id: str, pages_done: int, seconds: float) -> None:
        """A page of a running task is done; ``seconds`` is its share of its engine call, 0 when it
        was read back from an earlier attempt (then nothing was timed).

        The sample is the time since the task's previous page: with batches or concurrent calls,
        pages arrive in bursts, and the gaps between them, not each call's length, give the rate.
        """
        entry = self._entries.get(task_id)
        if entry is None:
            return
        entry.pages_done = pages_done
        if seconds <= 0:
            return
        now = time.monotonic()
        sample = seconds if entry.last_page_at is None else now - entry.last_page_at
        entry.last_page_at = now
        previous = self.seconds_per_page
        self.seconds_per_page = sample if previous is None else previous + SMOOTHING * (sample - previous)

    def left(self, task_id: str) -> None:
        """The task ended, was canceled, or no longer waits in this process (shutdown)."""
        self._entries.pop(task_id, None)

    def estimate(self, task_id: str, now: datetime, ahead: Collection[str]) -> QueueEstimate | None:
        """Where a queued task stands, ``ahead`` being the tasks that start before it
        (``MemoryQueue.ahead``); ``None`` for a task that is running or not on the board."""
        entry = self._entries.get(task_id)
        if entry is None or entry.running:
            return None
        position, pages_ahead = 1, 0
        for other_id, other in self._entries.items():
            if other.running:
                pages_ahead += max(other.pages_total - other.pages_done, 0)
            elif other_id in ahead:
                position += 1
                pages_ahead += other.pages_total
        if self.seconds_per_page is None:
            return QueueEstimate(position, None, None)
        start = now + timedelta(seconds=pages_ahead * self.seconds_per_page / self._workers)
        end = start + timedelta(seconds=entry.pages_total * self.seconds_per_page)
        return QueueEstimate(position, start, end)
