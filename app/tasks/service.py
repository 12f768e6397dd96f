"""The task service: accepting, reading, canceling and expiring tasks, and recovery at start-up.

Routers call this and nothing else. Processing lives in ``worker.py``; both share the store and
the queue. Blocking store calls run in threads.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from app.errors import (
    DsocrError,
    InvalidOptions,
    QueueFull,
    TaskAlreadyFinished,
    TaskNotFinished,
    TooManyPages,
)
from app.metrics import Metrics
from app.pipeline.pages import count_pages, select_pages
from app.pipeline.sources import ReceivedFile
from app.storage.local import LocalStore
from app.tasks.model import Progress, SourceInfo, TaskOptions, TaskRecord, TaskStatus
from app.tasks.queue import TaskQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_pages: int
    max_dpi: int
    max_page_pixels: int
    result_ttl_hours: float
    workers: int


class TaskService:
    def __init__(self, *, store: LocalStore, queue: TaskQueue, metrics: Metrics, limits: Limits) -> None:
        self.store = store
        self.queue = queue
        self.metrics = metrics
        self.limits = limits
        self._running_cancel: set[str] = set()  # cancel requests for tasks a worker holds
        # Serialises status changes (cancel vs. a worker starting the task) so neither overwrites the other.
        self.status_lock = asyncio.Lock()
        self._seconds_per_task = 30.0  # moving average, seeds Retry-After before the first task ends

    # --- submit ---

    def ensure_capacity(self) -> None:
        """Refuse before reading a body when the queue is already full."""
        if self.queue.full():
            raise self._queue_full()

    def spool_path(self) -> Path:
        return self.store.spool_path()

    async def submit(
        self, received: ReceivedFile, options: TaskOptions, *, url: str | None = None
    ) -> TaskRecord:
        """Validate the document and options, store the task and queue it.

        The spooled input is moved into the task or deleted; nothing is left behind on refusal.
        """
        try:
            if options.dpi > self.limits.max_dpi:
                raise InvalidOptions(f"dpi {options.dpi} is above the limit of {self.limits.max_dpi}")
            page_count = await asyncio.to_thread(
                count_pages, received.path, received.kind, max_pixels=self.limits.max_page_pixels
            )
            numbers = select_pages(options.pages, page_count)
            if len(numbers) > self.limits.max_pages:
                raise TooManyPages(
                    f"{len(numbers)} pages selected; the limit is {self.limits.max_pages} (APP_MAX_PAGES). "
                    'Select fewer with the "pages" option.'
                )
            try:
                reservation = self.queue.reserve()
            except QueueFull:
                raise self._queue_full() from None
            record = TaskRecord(
                source=SourceInfo(
                    filename=received.filename,
                    content_type=received.kind.content_type,
                    size_bytes=received.size_bytes,
                    pages=page_count,
                    url=url,
                ),
                options=options,
                page_numbers=numbers,
                input_name=f"document.{received.kind.value}",
                input_kind=received.kind,
                progress=Progress(pages_total=len(numbers)),
            )
            try:
                await asyncio.to_thread(self.store.create, record, received.path)
            except BaseException:
                reservation.release()
                raise
            reservation.commit(record.task_id)
        except BaseException as exc:
            received.path.unlink(missing_ok=True)
            if isinstance(exc, DsocrError) and not isinstance(exc, QueueFull):  # _queue_full counted it
                self.metrics.tasks_rejected.labels(exc.code).inc()
            raise
        self.metrics.tasks_submitted.inc()
        self.metrics.queue_depth.set(self.queue.depth())
        log.info("task %s queued: %s, %d pages", record.task_id, received.filename, len(numbers))
        return record

    def _queue_full(self) -> QueueFull:
        depth = self.queue.depth()
        wait = math.ceil(self._seconds_per_task * max(depth, 1) / self.limits.workers)
        self.metrics.tasks_rejected.labels("queue_full").inc()
        return QueueFull(
            f"the queue is full ({depth} tasks waiting); retry later", retry_after=min(max(wait, 1), 600)
        )

    def observe_task_seconds(self, seconds: float) -> None:
        self._seconds_per_task = 0.8 * self._seconds_per_task + 0.2 * seconds

    # --- read ---

    async def get(self, task_id: str) -> TaskRecord:
        return await asyncio.to_thread(self.store.load, task_id)

    async def open_result(self, task_id: str, name: str) -> BinaryIO:
        """An open stream of a result file of a succeeded task; 409 while it is not finished."""
        record = await self.get(task_id)
        if record.status is not TaskStatus.SUCCEEDED:
            raise TaskNotFinished(f"task {task_id} is {record.status.value}; results exist once it succeeded")
        return await asyncio.to_thread(self.store.open_result, task_id, name)

    # --- cancel ---

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a queued task now, or a running one at its next page boundary.

        A running task's record is written by its worker alone, which sees the request between
        pages and records the cancel itself.
        """
        async with self.status_lock:
            record = await self.get(task_id)
            if record.status.is_final:
                raise TaskAlreadyFinished(f"task {task_id} already {record.status.value}")
            record.cancel_requested = True
            if record.status is TaskStatus.RUNNING:
                self._running_cancel.add(task_id)
                return record
            record.status = TaskStatus.CANCELED
            record.finished_at = datetime.now(UTC)
            record.waiting_reason = None
            await asyncio.to_thread(self.store.save, record)
            self.queue.discard(task_id)
        self.metrics.tasks_finished.labels(TaskStatus.CANCELED.value).inc()
        self.metrics.queue_depth.set(self.queue.depth())
        return record

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self._running_cancel

    def forget_cancel(self, task_id: str) -> None:
        self._running_cancel.discard(task_id)

    # --- lifecycle ---

    def recover(self) -> int:
        """Queue again every task a previous process accepted but did not finish (blocking).

        Oldest first. A task that was ``running`` resumes from its stored raw pages.
        """
        self.store.clear_spool()
        pending = [r for r in self.store.list_records() if not r.status.is_final]
        pending.sort(key=lambda r: r.created_at)
        for record in pending:
            if record.cancel_requested:
                record.status = TaskStatus.CANCELED
                record.finished_at = datetime.now(UTC)
            else:
                record.status = TaskStatus.QUEUED
            self.store.save(record)
            if record.status is TaskStatus.QUEUED:
                self.queue.requeue(record.task_id)
        resumed = sum(1 for r in pending if r.status is TaskStatus.QUEUED)
        if resumed:
            log.info("recovered %d unfinished tasks", resumed)
        self.metrics.queue_depth.set(self.queue.depth())
        return resumed

    def expire(self) -> int:
        """Delete finished tasks older than the result TTL (blocking); returns how many."""
        cutoff = datetime.now(UTC) - timedelta(hours=self.limits.result_ttl_hours)
        expired = 0
        for record in self.store.list_records():
            if record.status.is_final and (record.finished_at or record.created_at) < cutoff:
                self.store.delete(record.task_id)
                expired += 1
        if expired:
            log.info("expired %d finished tasks", expired)
        return expired

    async def run_janitor(self, every_seconds: float) -> None:
        """Expire old tasks periodically; runs until cancelled."""
        while True:
            await asyncio.to_thread(self.expire)
            await asyncio.sleep(every_seconds)
