"""The ledger: every change of a task that followers hear about, in one place.

The worker pool and the task service are both given the ledger. Through it a record is saved and
then its event published (``update``), a page is counted (``page_done``), a task ends (``finish``),
and cancels reach the worker running a task. It also keeps what a view needs beyond the record:
the queue estimate. Blocking store calls run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from app.errors import BackendUnavailable
from app.metrics import Metrics
from app.records import QueueEstimate, TaskErrorInfo, TaskRecord, TaskStatus
from app.storage.base import TaskStore
from app.tasks.estimates import QueueBoard
from app.tasks.events import EventHub, EventKind, TaskEvent
from app.tasks.followups import FollowUps
from app.tasks.queue import MemoryQueue, TaskQueue
from app.tasks.usage import UsageMeter
from app.views import TaskView

log = logging.getLogger(__name__)


class TaskLedger:
    def __init__(
        self,
        *,
        store: TaskStore,
        queue: TaskQueue,
        events: EventHub,
        metrics: Metrics,
        workers: int,
        followups: FollowUps | None = None,
        usage: UsageMeter | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self.events = events
        self.metrics = metrics
        self.followups = followups  # publish and webhook after a task ends; None: neither exists
        self.usage = usage  # what tasks cost, recorded as each ends; None: not recorded
        self._board = QueueBoard(workers=workers)
        self._running_cancel: set[str] = set()  # cancel requests for tasks a worker of this process holds
        # Serialises status changes (a cancel, a worker starting the task) so neither overwrites the other.
        self.status_lock = asyncio.Lock()
        self._seconds_per_task = 30.0  # moving average, seeds Retry-After before the first task ends

    async def load(self, task_id: str) -> TaskRecord:
        """The stored record, whoever owns it; ``TaskNotFound`` when there is none."""
        return await asyncio.to_thread(self.store.load, task_id)

    # --- views ---

    async def view(self, record: TaskRecord) -> TaskView:
        """The task view of ``record``, with its queue position and estimates while it is queued.

        With a shared queue the position comes from the queue itself and there are no estimates:
        the board that makes them sees the tasks of this process only, while starts and ends
        happen in the workers.
        """
        estimate = None
        if record.status is TaskStatus.QUEUED:
            if self.queue.durable:
                position = await self.queue.position(record.task_id)
                estimate = QueueEstimate(position, None, None) if position is not None else None
            else:
                # Not durable: the one-process queue, whose schedule says which tasks go first. A
                # queued task it no longer holds is a worker's, about to start (the GPU gate).
                assert isinstance(self.queue, MemoryQueue)
                ahead = set(self.queue.ahead(record.task_id) or ())
                estimate = self._board.estimate(record.task_id, datetime.now(UTC), ahead)
        return TaskView.from_record(record, estimate)

    def queued(self, record: TaskRecord) -> None:
        """``record`` joined the queue (new, or recovered): the board estimates its start from now.
        A shared queue's starts and ends happen in other processes, so it keeps no board."""
        if not self.queue.durable:
            self._board.queued(record.task_id, len(record.page_numbers))

    # --- changes, told to followers ---

    async def update(
        self, record: TaskRecord, kind: EventKind, data: str | None = None, *, expect_lease: int | None = None
    ) -> None:
        """Save a changed record, then publish ``kind`` about it (``data``: the task view unless given).

        The event's id is stored on the record before it is written (see ``app.tasks.events``). The
        write is shielded from cancellation: a final or interrupted state must reach the disk even
        when shutdown cancels the caller. A shared store refuses it with ``LeaseLost`` when the
        stored lease is not ``expect_lease`` (default: the record's own), and nothing is published.
        """
        record.last_event_id += 1
        if kind is EventKind.END or record.status is TaskStatus.QUEUED:
            self._board.left(record.task_id)  # ended, or sent back by a shutdown: no longer queued here
        elif record.status is TaskStatus.RUNNING and kind is EventKind.STATUS:
            self._board.started(record.task_id)
        if data is None:
            data = (await self.view(record)).model_dump_json(by_alias=True)
        await asyncio.shield(asyncio.to_thread(self.store.save, record, expect_lease=expect_lease))
        await self.events.publish(record.task_id, TaskEvent(record.last_event_id, kind, data))

    async def page_done(self, record: TaskRecord, *, number: int, index: int, seconds: float) -> None:
        """Save a running task's progress after a page and publish a ``page`` event.

        ``seconds`` is the page's share of its engine call (0 when read back from an earlier try).
        """
        self._board.page_done(record.task_id, record.progress.pages_done, seconds)
        data = {
            "page": number,
            "index": index,
            "pages_done": record.progress.pages_done,
            "pages_total": record.progress.pages_total,
            "seconds": round(seconds, 3),
        }
        await self.update(record, EventKind.PAGE, json.dumps(data))

    async def finish(
        self,
        record: TaskRecord,
        status: TaskStatus,
        error: TaskErrorInfo | None = None,
        *,
        before_save: Callable[[TaskRecord], Awaitable[None]] | None = None,
    ) -> None:
        """End the task (``TaskRecord.finish``), save it, publish ``end`` and count it.

        ``before_save`` writes what is made of the final record (``result.json``) before the record
        is saved, so that nobody sees the task ended without it.

        Publish and webhook are marked due on the final record itself, so a restart resumes them,
        and start only once it is saved: they run in the background and never delay the caller.
        Raises ``LeaseLost`` (nothing published, nothing started) when a shared store finds the
        task taken by another worker since ``record`` was read.
        """
        record.finish(status, error)
        if before_save is not None:
            await before_save(record)
        await self.ended(record)

    async def ended(self, record: TaskRecord) -> None:
        """Save a record that has just ended (``finish``, or a queued task's ``cancel``), publish
        ``end``, count it, record its usage and start its follow-ups; raises as ``finish`` does.

        The usage goes on the final record and into the usage store only after that record is
        saved: the save succeeds once per task, so the task is counted once (``app.tasks.usage``)."""
        status = record.status
        if self.usage is not None:
            record.usage = await asyncio.to_thread(self.usage.measure, record)
        due = self.followups is not None and self.followups.plan(record)
        await self.update(record, EventKind.END)
        if self.usage is not None:
            await self.usage.task_ended(record)
        self.metrics.tasks_finished.labels(status.value).inc()
        if record.duration_seconds is not None:
            self.metrics.task_duration.labels(status.value).observe(record.duration_seconds)
            if status is TaskStatus.SUCCEEDED:
                self._seconds_per_task = 0.8 * self._seconds_per_task + 0.2 * record.duration_seconds
        log.info("task %s %s", record.task_id, status.value)
        if due and self.followups is not None:
            self.followups.launch(record.task_id)

    @property
    def seconds_per_task(self) -> float:
        """A moving average of how long a task took to succeed here (30 s before the first)."""
        return self._seconds_per_task

    # --- cancels of running tasks ---

    def request_cancel(self, task_id: str) -> None:
        """Ask the worker running ``task_id`` in this process to stop it at its next page boundary
        (a cancel asked here, or passed on from another process by the worker's lease keeper)."""
        self._running_cancel.add(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self._running_cancel

    def forget_cancel(self, task_id: str) -> None:
        self._running_cancel.discard(task_id)

    # --- the queue's gauges ---

    async def sample_queue(self) -> None:
        """Set the queue gauges from the queue (shared: from Redis, so every process agrees)."""
        self.metrics.queue_depth.set(await self.queue.depth())
        self.metrics.queue_oldest_age.set(await self.queue.oldest_age())

    async def run_queue_monitor(self, every_seconds: float) -> None:
        """Sample the queue gauges periodically; runs until cancelled. A shared queue changes
        under other processes, so events here alone cannot keep them current."""
        while True:
            with contextlib.suppress(BackendUnavailable):
                await self.sample_queue()
            await asyncio.sleep(every_seconds)
