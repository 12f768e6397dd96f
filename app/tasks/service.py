"""The task service, the routers' facade: accepting, reading, listing, following, canceling and
expiring tasks, and recovery at start-up (downloads go through ``downloads.Downloads``, new tasks
arrive through ``intake.Intake``).

Processing lives in ``worker.py``; both are given the ``TaskLedger``, through which every change
of a record that followers hear about goes, and every change of status is one of the record's
lifecycle methods. Blocking store calls run in threads.

Ownership: who may see a task is ``TaskRecord.visible_to``; a task a caller may not see is reported
exactly as a missing one (``TaskNotFound``, 404)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from app.errors import (
    BackendUnavailable,
    InvalidOptions,
    LeaseLost,
    QueueFull,
    TaskNotFound,
    TooManyPages,
)
from app.pipeline.pages import Inspection
from app.pipeline.render_pool import RenderPool
from app.pipeline.sources import ReceivedFile
from app.records import (
    MAX_STRIKES,
    Progress,
    SourceInfo,
    TaskOptions,
    TaskRecord,
    TaskStatus,
)
from app.tasks.events import EventKind, TaskEvent
from app.tasks.idempotency import IdempotencyKeys, fingerprint
from app.tasks.ledger import TaskLedger
from app.tasks.quotas import Admission, Quotas
from app.tenants import Tenant
from app.views import TaskList, TaskView

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CANCEL_TRIES = 3  # reads of a record a worker may take between the read and the write
_CURSOR = re.compile(r"^(\d{1,20})_([0-9a-f]{32})$")  # "<created_at in µs>_<task_id>" of the last task shown


@dataclass(frozen=True)
class Limits:
    max_pages: int
    max_dpi: int
    max_page_pixels: int
    result_ttl_hours: float
    workers: int


@dataclass(frozen=True)
class Created:
    """The outcome of a create request: the task, and whether an ``Idempotency-Key`` found it."""

    record: TaskRecord
    replayed: bool  # True: the key was seen with the same request; no task was created now


class TaskService:
    def __init__(
        self, *, ledger: TaskLedger, limits: Limits, renders: RenderPool, quotas: Quotas | None = None
    ) -> None:
        """``quotas``: the tenants' queued-task and page-per-day limits, checked at submit for a
        caller with a tenant (``None``: no tenant quotas, as for a process that accepts no tasks)."""
        self._ledger = ledger
        self._store = ledger.store
        self._queue = ledger.queue
        self._events = ledger.events
        self._metrics = ledger.metrics
        self._followups = ledger.followups
        self._limits = limits
        self._renders = renders  # opens and counts uploads, away from the event loop
        self._keys = IdempotencyKeys(ledger.store)
        self._quotas = quotas

    # --- submit ---

    async def ensure_capacity(self, tenant: Tenant | None = None) -> None:
        """Refuse before reading a body when the queue is already full, or ``tenant`` is at its
        queued-task limit or out of pages for today (``Quotas.check``: counts nothing)."""
        if await self._queue.full():
            raise await self._queue_full()
        if tenant is not None and self._quotas is not None:
            await self._quotas.check(tenant, queued_retry_after=self._queued_retry_after())

    async def create_from_upload(
        self,
        received: ReceivedFile,
        options: TaskOptions,
        *,
        owner: str | None,
        idempotency_key: str | None,
        tenant: Tenant | None = None,
    ) -> Created:
        """Queue an uploaded document; with an ``idempotency_key`` seen before, find its task instead.

        The spooled upload is moved into the new task or deleted, whatever happens. Raises what
        ``submit`` raises, and ``IdempotencyKeyReused`` for a key seen with another request.
        """
        try:
            if idempotency_key is None:
                record = await self.submit(received, options, owner=owner, tenant=tenant)
                return Created(record, replayed=False)
            request_print = await asyncio.to_thread(fingerprint, options, upload=received.path)

            async def create() -> TaskRecord:
                return await self.submit(received, options, owner=owner, tenant=tenant)

            return await self._once(owner, idempotency_key, request_print, create)
        finally:
            received.path.unlink(missing_ok=True)  # already gone when a task took it

    async def create_from_url(
        self,
        url: str,
        options: TaskOptions,
        fetch: Callable[[], Awaitable[ReceivedFile]],
        *,
        owner: str | None,
        idempotency_key: str | None,
        tenant: Tenant | None = None,
    ) -> Created:
        """Queue the document ``fetch`` downloads from ``url``; with an ``idempotency_key`` seen
        before, find its task instead, without downloading anything."""

        async def create() -> TaskRecord:
            return await self.submit(await fetch(), options, url=url, owner=owner, tenant=tenant)

        if idempotency_key is None:
            return Created(await create(), replayed=False)
        return await self._once(owner, idempotency_key, fingerprint(options, url=url), create)

    async def _once(
        self,
        owner: str | None,
        key: str,
        request_print: str,
        create: Callable[[], Awaitable[TaskRecord]],
    ) -> Created:
        """The task ``key`` made for this request within 24 h, or ``create`` it and remember it;
        one request per key at a time, so concurrent retries make one task."""
        async with self._keys.serialised(owner, key):
            task_id = await self._keys.find(owner, key, request_print)
            if task_id is not None:
                # A task gone already (a TTL under 24 h) frees its key: the retry creates it again.
                with contextlib.suppress(TaskNotFound):
                    return Created(await self.get(task_id), replayed=True)
            record = await create()
            await self._keys.remember(owner, key, request_print, record.task_id)
            return Created(record, replayed=False)

    async def submit(
        self,
        received: ReceivedFile,
        options: TaskOptions,
        *,
        url: str | None = None,
        owner: str | None = None,
        tenant: Tenant | None = None,
    ) -> TaskRecord:
        """Validate the document and options, store the task (belonging to ``owner``, of ``tenant``,
        within its limits: ``max_pages``, and ``queued_tasks`` and ``pages_per_day`` through
        ``Quotas``) and queue it.

        The spooled input is moved into the task or deleted; nothing is left behind on refusal, and
        nothing is counted against the tenant's quotas.
        """
        try:
            if options.callback_url is not None:
                await self._check_callback(options.callback_url, tenant)
            if options.dpi > self._limits.max_dpi:
                raise InvalidOptions(f"dpi {options.dpi} is above the limit of {self._limits.max_dpi}")
            inspection = await self._inspect(received, options, tenant)
            page_count, numbers = inspection.page_count, inspection.numbers
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
                owner=owner,
                tenant=tenant.name if tenant is not None else None,
                last_event_id=1,
            )
            async with self._counted(tenant, record):
                try:
                    reservation = await self._queue.reserve()
                except QueueFull:
                    raise await self._queue_full() from None
                try:
                    await asyncio.to_thread(self._store.create, record, received.path)
                except BaseException:
                    await reservation.release()
                    raise
            await reservation.commit(record.task_id, tenant=record.tenant, priority=options.priority)
            self._ledger.queued(record)
        except BaseException:
            received.path.unlink(missing_ok=True)
            raise
        self._metrics.tasks_submitted.inc()
        await self._ledger.sample_queue()
        log.info("task %s queued: %s, %d pages", record.task_id, received.filename, len(numbers))
        return record

    async def _inspect(
        self, received: ReceivedFile, options: TaskOptions, tenant: Tenant | None
    ) -> Inspection:
        """Open and count the document within the tenant's ``max_pages`` (else ``APP_MAX_PAGES``)."""
        own_limit = tenant.limits.max_pages if tenant is not None else None
        try:
            return await self._renders.inspect(
                received.path,
                received.kind,
                options.pages,
                max_pages=own_limit if own_limit is not None else self._limits.max_pages,
                max_pixels=self._limits.max_page_pixels,
            )
        except TooManyPages as exc:
            if own_limit is None or tenant is None:
                raise
            raise TooManyPages(
                f"tenant {tenant.name!r} may submit at most {own_limit} pages per task (max_pages in "
                'APP_TENANTS_FILE); select fewer with the "pages" option'
            ) from exc

    @contextlib.asynccontextmanager
    async def _counted(self, tenant: Tenant | None, record: TaskRecord) -> AsyncIterator[None]:
        """Count ``record`` against its tenant's quotas for the block (``QuotaExceeded`` before it
        when past one), and take the count back if the block fails: a task not stored is not counted."""
        if tenant is None or self._quotas is None:
            yield
            return
        admission: Admission = await self._quotas.admit(
            tenant,
            record.task_id,
            pages=len(record.page_numbers),
            queued_retry_after=self._queued_retry_after(),
        )
        try:
            yield
        except BaseException:
            await self._quotas.release(admission)
            raise

    def _queued_retry_after(self) -> int:
        """Seconds until one of a tenant's queued tasks has likely started: one task's time."""
        return min(max(math.ceil(self._ledger.seconds_per_task), 1), 600)

    async def _check_callback(self, url: str, tenant: Tenant | None) -> None:
        if self._followups is None:
            raise InvalidOptions("this service does not send webhooks; leave callback_url out")
        await self._followups.check_callback(url, tenant.name if tenant is not None else None)

    async def _queue_full(self) -> QueueFull:
        depth = await self._queue.depth()
        wait = math.ceil(self._ledger.seconds_per_task * max(depth, 1) / self._limits.workers)
        return QueueFull(
            f"the queue is full ({depth} tasks waiting); retry later", retry_after=min(max(wait, 1), 600)
        )

    # --- read ---

    async def get(self, task_id: str, owner: str | None = None) -> TaskRecord:
        """The task's record; ``TaskNotFound`` when there is none or ``owner`` may not see it.

        ``owner`` is the caller's key hash; ``None`` (auth off, or the service itself) sees all.
        """
        record = await self._ledger.load(task_id)
        if not record.visible_to(owner):
            raise TaskNotFound(f"no task {task_id!r}")
        return record

    async def view(self, record: TaskRecord) -> TaskView:
        """The task view of ``record``, with its queue position and estimates while it is queued."""
        return await self._ledger.view(record)

    async def list_tasks(
        self, *, owner: str | None, status: TaskStatus | None, limit: int, cursor: str | None
    ) -> TaskList:
        """The tasks ``owner`` may see, newest first, ``limit`` at a time; ``cursor`` is a previous
        page's ``next_cursor``. Raises ``InvalidOptions`` for a cursor this service did not issue."""
        after = _parse_cursor(cursor) if cursor is not None else None
        summaries = await asyncio.to_thread(self._store.summaries)
        keys = sorted(
            (
                (_micros(s.created_at), s.task_id)
                for s in summaries
                if s.visible_to(owner) and (status is None or s.status is status)
            ),
            reverse=True,
        )
        if after is not None:
            keys = [key for key in keys if key < after]
        page = keys[:limit]
        records = await asyncio.to_thread(self._load_existing, [task_id for _, task_id in page])
        next_cursor = f"{page[-1][0]}_{page[-1][1]}" if len(keys) > limit else None
        return TaskList(tasks=[await self.view(record) for record in records], next_cursor=next_cursor)

    def _load_existing(self, task_ids: list[str]) -> list[TaskRecord]:
        records = []
        for task_id in task_ids:
            with contextlib.suppress(TaskNotFound):  # expired since it was listed
                records.append(self._store.load(task_id))
        return records

    # --- follow ---

    async def wait(self, task_id: str, *, owner: str | None, seconds: float) -> TaskRecord:
        """The task's record once it has ended, or after ``seconds``, whichever comes first.

        Waits on the task's events, not by reading its record again and again.
        """
        record = await self.get(task_id, owner)
        if record.status.is_final or seconds <= 0:
            return record
        with contextlib.suppress(TimeoutError):
            async with (
                asyncio.timeout(seconds),
                contextlib.aclosing(self._events.follow(task_id, record.last_event_id)) as events,
            ):
                async for event in events:
                    if event.kind is EventKind.END:
                        break
        return await self.get(task_id)

    async def follow(
        self, task_id: str, *, owner: str | None, last_event_id: int | None
    ) -> AsyncGenerator[TaskEvent, None] | None:
        """The events of a task for an event stream, or ``None`` when the caller saw its end already.

        Without ``last_event_id`` (a new stream; ``events.parse_last_event_id`` reads the header) the
        first event is the task's current state: ``status``, or ``end`` for a task that is over, then
        each new event until ``end``. With the id of the last event a reconnecting client got, it gets
        the events after it; if this process no longer holds them (a restart, or they aged out), the
        current state instead, so nothing is lost or sent twice. Raises ``TaskNotFound`` before
        anything is streamed.
        """
        record = await self.get(task_id, owner)
        after = last_event_id
        if after is not None and after > record.last_event_id:
            after = None  # not an id this task has issued: start afresh
        if after is not None and record.status.is_final and after >= record.last_event_id:
            return None
        return self._follow(record, after)

    async def _follow(self, record: TaskRecord, after: int | None) -> AsyncGenerator[TaskEvent, None]:
        oldest = await self._events.oldest(record.task_id)
        # Every event up to record.last_event_id is reflected in the record (saved before published).
        missed = after is None or (record.last_event_id > after and (oldest is None or oldest > after + 1))
        if missed:
            kind = EventKind.END if record.status.is_final else EventKind.STATUS
            view = await self.view(record)
            yield TaskEvent(record.last_event_id, kind, view.model_dump_json(by_alias=True))
            if kind is EventKind.END:
                return
            after = record.last_event_id
        assert after is not None
        async with contextlib.aclosing(self._events.follow(record.task_id, after)) as events:
            async for event in events:
                yield event

    # --- cancel ---

    async def cancel(self, task_id: str, owner: str | None = None) -> TaskRecord:
        """Cancel a queued task now, or a running one at its next page boundary.

        A running task's record is written by its worker alone, which sees the request between
        pages and records the cancel itself.
        """
        async with self._ledger.status_lock:
            for _ in range(_CANCEL_TRIES):
                record = await self.get(task_id, owner)
                if not record.cancel():
                    self._ledger.request_cancel(task_id)  # a worker of this process sees it at once
                    await asyncio.to_thread(self._store.request_cancel, task_id)  # any other, shortly
                    return record
                try:
                    await self._ledger.ended(record)
                except LeaseLost:
                    continue  # a worker took the task since it was read: it is running now
                break
            else:
                raise LeaseLost(f"task {task_id} changed hands {_CANCEL_TRIES} times during the cancel")
            await self._queue.discard(task_id)
        await self._ledger.sample_queue()
        return record

    # --- lifecycle ---

    async def recover(self) -> int:
        """Queue again every task a previous process accepted but did not finish.

        Oldest first. A task still ``running`` lost its worker with the previous process (a shutdown
        hands its task back ``queued``): that death is told to the record, whose rule decides
        whether it counts against the task (``TaskRecord.interrupted``), and the task resumes from
        its stored raw pages, or fails at its start if its pages keep killing the service. A
        durable queue needs none of this: it redelivers what a stopped worker held, and the worker
        taking it applies the same rule.
        """
        await asyncio.to_thread(self._store.clear_spool)
        if self._queue.durable:
            return 0
        pending = await asyncio.to_thread(self._unfinished)
        usage = self._ledger.usage
        for record in pending:
            if record.cancel_requested:
                record.finish(TaskStatus.CANCELED)
                if usage is not None:
                    record.usage = await asyncio.to_thread(usage.measure, record)
                if self._followups is not None:
                    self._followups.plan(record)  # started with the other unfinished follow-ups
            elif record.status is TaskStatus.RUNNING:
                if record.interrupted():
                    log.warning(
                        "task %s: the service died at its page %s, with no page done since it started "
                        "(strike %d of %d)",
                        record.task_id,
                        record.stuck_page,
                        record.strikes,
                        MAX_STRIKES,
                    )
                record.requeue("interrupted by a restart; resumes from its last finished page")
            # A status change nobody here follows yet; counted, so a client that reconnects with an
            # id from before the restart gets the state as it is now.
            record.last_event_id += 1
            await asyncio.to_thread(self._store.save, record)
            if record.status.is_final and usage is not None:
                await usage.task_ended(record)  # after the save, as TaskLedger.ended does
            if record.status is TaskStatus.QUEUED:
                await self._queue.requeue(
                    record.task_id, tenant=record.tenant, priority=record.options.priority
                )
                self._ledger.queued(record)
        resumed = sum(1 for r in pending if r.status is TaskStatus.QUEUED)
        if resumed:
            log.info("recovered %d unfinished tasks", resumed)
        await self._ledger.sample_queue()
        return resumed

    def _unfinished(self) -> list[TaskRecord]:
        pending = [r for r in self._store.list_records() if not r.status.is_final]
        pending.sort(key=lambda r: r.created_at)
        return pending

    def expire(self) -> int:
        """Delete finished tasks older than the result TTL (blocking); returns how many."""
        cutoff = datetime.now(UTC) - timedelta(hours=self._limits.result_ttl_hours)
        expired = 0
        for summary in self._store.summaries():
            if summary.status.is_final and (summary.finished_at or summary.created_at) < cutoff:
                self._store.delete(summary.task_id)
                expired += 1
        if expired:
            log.info("expired %d finished tasks", expired)
        keys = self._keys.expire()
        if keys:
            log.info("expired %d idempotency keys", keys)
        return expired

    async def run_janitor(self, every_seconds: float) -> None:
        """Expire old tasks periodically; runs until cancelled. With several API replicas each
        runs it: deleting a task twice is harmless."""
        while True:
            try:
                await asyncio.to_thread(self.expire)
            except BackendUnavailable as exc:
                log.warning("expiring old tasks skipped: %s", exc.message)
            await asyncio.sleep(every_seconds)


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _parse_cursor(cursor: str) -> tuple[int, str]:
    match = _CURSOR.match(cursor)
    if match is None:
        raise InvalidOptions("cursor is not one this service issued; pass a next_cursor as it came")
    return int(match[1]), match[2]
