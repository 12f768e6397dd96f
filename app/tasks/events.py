"""Task events: what happened to a task, in order, for whoever follows it (event streams, long-polls).

    worker, service ──publish(task_id, event)──▶ EventHub ──follow(task_id, after)──▶ followers

An event's ``id`` is the task's own counter, ``TaskRecord.last_event_id``: the publisher stores the
new id on the record and saves it *before* publishing. So ids keep increasing across restarts, and a
record read from the store reflects every event up to its ``last_event_id``: a follower that has
missed events the hub no longer holds can start again from the record without losing or repeating
anything. The hub carries and holds events; it never reads records.

``MemoryEventHub`` is the in-process hub. Publishing appends to the task's log and sets one
``asyncio.Event`` that wakes all its followers at once; a follower is a suspended coroutine, so open
streams cost neither a thread nor any polling, and the publisher never waits for them. A hub shared
by several processes (Redis Streams: ``XADD`` with the id, ``XRANGE`` / ``XREAD BLOCK`` to follow)
can replace it behind the same three methods.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class EventKind(StrEnum):
    """What an event says; it is the SSE ``event:`` field."""

    STATUS = "status"  # the status changed to a non-final one; data: the task view
    PAGE = "page"  # a page is done; data: {"page", "index", "pages_done", "pages_total", "seconds"}
    END = "end"  # the task ended (succeeded, failed or canceled); data: the task view; nothing follows


@dataclass(frozen=True)
class TaskEvent:
    id: int  # the task's event counter: increasing, never reused (see the module docstring)
    kind: EventKind
    data: str  # JSON, encoded once by the publisher and sent as is to every follower


MAX_EVENT_ID_DIGITS = 18  # ids are a task's event counter: far below 10**18, and within an int64


def parse_last_event_id(value: str | None) -> int | None:
    """The event id in a reconnecting client's ``Last-Event-ID`` header, or ``None`` to start over.

    The SSE spec has a client send back the last ``id:`` it received, as is, and leaves its meaning
    to the server. Ours are decimal counters, so anything else (empty, signed, too long, or digits
    other than ASCII ones, such as "²", which ``str.isdigit`` accepts and ``int`` refuses) is an id
    this service never sent: it counts as absent, and the stream starts from the task's state.
    """
    text = (value or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > MAX_EVENT_ID_DIGITS:
        return None
    return int(text)


class EventHub(Protocol):
    """Carries a task's events from their publisher to its followers."""

    async def publish(self, task_id: str, event: TaskEvent) -> None:
        """Hand ``event`` to every follower of ``task_id`` and hold it for later ones.

        Returns without waiting for any follower. Ids of one task must increase (``ValueError``).
        """

    async def oldest(self, task_id: str) -> int | None:
        """The id of the oldest event held for ``task_id``; ``None`` when none is held."""

    def follow(self, task_id: str, after: int) -> AsyncGenerator[TaskEvent, None]:
        """The held events of ``task_id`` with an id above ``after``, then each new one as it is
        published, oldest first; ends after an ``end`` event, or at once when the held ``end`` is
        not above ``after``.

        Events no longer held are skipped, not reported: callers that must not miss any compare
        ``after`` with ``oldest`` first. Close the iterator (``contextlib.aclosing``) when done.
        """


class _Log:
    """One task's recent events and the wake-up its followers wait on."""

    def __init__(self, held: int) -> None:
        self.events: deque[TaskEvent] = deque(maxlen=held)
        self.wakeup = asyncio.Event()  # replaced at every publish; the old one wakes the followers
        self.followers = 0
        self.ended = False

    def since(self, after: int) -> list[TaskEvent]:
        newer: list[TaskEvent] = []
        # From the newest back: a follower that keeps up is one or two events behind.
        for event in reversed(self.events):
            if event.id <= after:
                break
            newer.append(event)
        newer.reverse()
        return newer


class MemoryEventHub:
    """The in-process ``EventHub``: a bounded log per task, kept ``keep_seconds`` after its end.

    ``held_per_task`` bounds a log (a follower that falls further behind skips the oldest events);
    a log without events and without followers is dropped at once.
    """

    def __init__(self, *, held_per_task: int = 10_000, keep_seconds: float = 300.0) -> None:
        self._held = held_per_task
        self._keep_seconds = keep_seconds  # reconnecting clients still find the end of recent tasks
        self._logs: dict[str, _Log] = {}

    def _log(self, task_id: str) -> _Log:
        log = self._logs.get(task_id)
        if log is None:
            log = self._logs[task_id] = _Log(self._held)
        return log

    async def publish(self, task_id: str, event: TaskEvent) -> None:
        log = self._log(task_id)
        if log.events and event.id <= log.events[-1].id:
            raise ValueError(f"event {event.id} of task {task_id} is not after {log.events[-1].id}")
        log.events.append(event)
        wakeup, log.wakeup = log.wakeup, asyncio.Event()
        wakeup.set()
        if event.kind is EventKind.END:
            log.ended = True
            asyncio.get_running_loop().call_later(self._keep_seconds, self._drop, task_id, log)

    async def oldest(self, task_id: str) -> int | None:
        log = self._logs.get(task_id)
        return log.events[0].id if log is not None and log.events else None

    async def follow(self, task_id: str, after: int) -> AsyncGenerator[TaskEvent, None]:
        log = self._log(task_id)
        log.followers += 1
        try:
            while True:
                wakeup = log.wakeup  # taken before reading, so a publish during the yields is not lost
                for event in log.since(after):
                    yield event
                    if event.kind is EventKind.END:
                        return
                    after = event.id
                if log.ended:
                    return
                await wakeup.wait()
        finally:
            log.followers -= 1
            if not log.followers and not log.events:
                self._drop(task_id, log)

    def _drop(self, task_id: str, log: _Log) -> None:
        if self._logs.get(task_id) is log:
            del self._logs[task_id]

    def held_tasks(self) -> int:
        """How many task logs are in memory (for tests and debugging)."""
        return len(self._logs)
