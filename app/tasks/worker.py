"""The worker pool: takes tasks from the queue, waits on the GPU gate, runs the page pipeline.

Each worker is an asyncio task started by the app's lifespan. A failure inside a task marks that
task failed and the worker carries on; a worker loop that dies anyway marks the service not ready.
Every change followers hear of (start, each page, the end) is saved and published through the
``TaskLedger`` the pool is given, which shields the write from cancellation. On shutdown a running task stops
at its next page boundary and goes back to ``queued``, to resume from its stored pages on the next
start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from app.engines.gpu import GpuGate
from app.engines.manager import ModelManager
from app.errors import BackendUnavailable, DsocrError, LeaseLost, TaskCanceled, TaskNotFound
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage
from app.pipeline.outputs import AssembledPages
from app.pipeline.run import PageJob, PagePipeline
from app.records import MAX_STRIKES, TaskErrorInfo, TaskRecord, TaskStatus
from app.tasks.events import EventKind
from app.tasks.ledger import TaskLedger
from app.tasks.options import EngineDefaults, ladder
from app.views import TaskView

log = logging.getLogger(__name__)

_CANCEL_POLL_SECONDS = 1.0  # how soon a cancel sent to another process reaches a running task
_RECONNECT_FIRST_SECONDS = 0.5  # backoff while the shared queue is unreachable, doubling...
_RECONNECT_MAX_SECONDS = 10.0  # ...up to this


class _ShuttingDown(Exception):
    """Raised at a page boundary when the service stops; the task is queued again, not failed."""


@dataclass(frozen=True)
class WorkerConfig:
    workers: int
    batch_size: int
    max_pixels: int
    engine: EngineDefaults
    visibility_seconds: float = 120.0  # a shared queue redelivers a task not renewed this long
    page_retries: int = 0  # APP_PAGE_RETRIES: retry rungs a suspect page may climb
    quality_min_agreement: float = 0.5  # APP_QUALITY_MIN_AGREEMENT


class WorkerPool:
    def __init__(
        self,
        *,
        ledger: TaskLedger,
        pipeline: PagePipeline,
        models: ModelManager,
        gate: GpuGate,
        metrics: Metrics,
        config: WorkerConfig,
    ) -> None:
        self._ledger = ledger
        self._queue = ledger.queue
        self._store = ledger.store
        self._pipeline = pipeline
        self._models = models
        self._gate = gate
        self._metrics = metrics
        self._config = config
        self._loops: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # loops inside a task, as opposed to waiting for one
        self._stopping = False

    @property
    def alive(self) -> int:
        return sum(1 for loop in self._loops if not loop.done())

    @property
    def healthy(self) -> bool:
        return self.alive == len(self._loops) == self._config.workers

    def start(self) -> None:
        for n in range(self._config.workers):
            loop = asyncio.create_task(self._run_loop(), name=f"dsocr-worker-{n}")
            loop.add_done_callback(self._loop_ended)
            self._loops.append(loop)
        self._metrics.workers_alive.set(self.alive)

    def _loop_ended(self, loop: asyncio.Task[None]) -> None:
        self._metrics.workers_alive.set(self.alive)
        if not loop.cancelled() and loop.exception() is not None:
            log.error("worker %s died", loop.get_name(), exc_info=loop.exception())

    async def stop(self, grace_seconds: float) -> None:
        """Let running tasks reach a page boundary (up to ``grace_seconds``), then cancel the loops."""
        self._stopping = True
        for loop in self._loops:
            if loop not in self._busy:
                loop.cancel()
        busy = [loop for loop in self._loops if not loop.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace_seconds)
            for loop in late:
                loop.cancel()  # its task stays "running" on disk and is recovered at the next start
            await asyncio.gather(*busy, return_exceptions=True)
        self._loops.clear()

    async def _run_loop(self) -> None:
        this = asyncio.current_task()
        assert this is not None
        queue = self._queue
        backoff = _RECONNECT_FIRST_SECONDS
        while not self._stopping:
            try:
                task_id = await queue.get()
            except BackendUnavailable as exc:
                log.warning("cannot take tasks, retrying in %.0f s: %s", backoff, exc.message)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_SECONDS)
                continue
            backoff = _RECONNECT_FIRST_SECONDS
            self._busy.add(this)
            try:
                kept = await self._process(task_id)
            finally:
                self._busy.discard(this)
            if kept:
                with contextlib.suppress(BackendUnavailable):  # unacknowledged: delivered again, skipped
                    await queue.ack(task_id)
            else:
                queue.forget(task_id)
            with contextlib.suppress(BackendUnavailable):
                await self._ledger.sample_queue()

    async def _claim(self, task_id: str) -> TaskRecord | None:
        """Take the task: mark it running under a new lease. ``None`` when it is gone, over
        (canceled while queued, or finished by a worker that died before acknowledging it), or
        taken by another worker between the read and the write."""
        async with self._ledger.status_lock:
            try:
                record = await self._ledger.load(task_id)
            except TaskNotFound:
                return None
            if record.status.is_final:
                return None
            # ``running`` arrives only from a shared queue: its worker went silent (died, or lost Redis
            # or its machine) and the task is redelivered. Whether that counts against the task is
            # the record's rule; recovery applies it for the in-process queue.
            if record.status is TaskStatus.RUNNING:
                log.warning("task %s: taking it over from a worker that went silent", task_id)
                if record.interrupted():
                    log.warning(
                        "task %s: no page done since its worker took it: strike %d of %d at page %s",
                        task_id,
                        record.strikes,
                        MAX_STRIKES,
                        record.stuck_page,
                    )
            record.start()
            try:
                await self._ledger.update(record, EventKind.STATUS, expect_lease=record.lease - 1)
            except LeaseLost:
                return None
            return record

    async def _wait_for_gpu(self, task_id: str) -> None:
        async def report(reason: str) -> None:
            async with self._ledger.status_lock:
                record = await self._ledger.load(task_id)
                if record.status is TaskStatus.QUEUED:
                    record.waiting_reason = reason
                    with contextlib.suppress(LeaseLost):  # taken by another worker: its reason is moot
                        await asyncio.to_thread(self._store.save, record)

        await self._gate.wait(report)

    async def _process(self, task_id: str) -> bool:
        """Run one delivered task to its end. ``False`` when this worker let go of it instead (its
        lease passed to another worker, or Redis or the bucket went away): it must not be
        acknowledged, so that it stays due, and nothing more is written about it here."""
        try:
            await self._wait_for_gpu(task_id)
            record = await self._claim(task_id)
            if record is None:
                return True
            lease_lost = asyncio.Event()
            keeper = asyncio.create_task(self._keep(task_id, lease_lost), name=f"dsocr-lease-{task_id}")
            try:
                await self._run(record, lease_lost)
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
        except LeaseLost as exc:
            self._metrics.lease_expiries.inc()
            log.warning("task %s: let go, another worker holds it now (%s)", task_id, exc.message)
            return False
        except BackendUnavailable as exc:
            log.warning("task %s: let go, it will be delivered again: %s", task_id, exc.message)
            return False
        return True

    async def _keep(self, task_id: str, lease_lost: asyncio.Event) -> None:
        """While the task runs: renew its hold on the queue, and pass on a cancel asked for on
        another process. Sets ``lease_lost`` when another worker has taken the task."""
        queue = self._queue
        if not queue.durable:
            return  # one process: the hold cannot lapse and cancels arrive directly
        every = min(self._config.visibility_seconds / 3, _CANCEL_POLL_SECONDS)
        renew_every = self._config.visibility_seconds / 3
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(every)
            try:
                if time.monotonic() - renewed >= renew_every - every / 2:
                    if not await queue.touch(task_id):
                        lease_lost.set()
                        return
                    renewed = time.monotonic()
                record = await self._ledger.load(task_id)
            except (BackendUnavailable, TaskNotFound):
                continue  # the next renewal tries again; past the timeout the task is redelivered
            if record.cancel_requested:
                self._ledger.request_cancel(task_id)

    async def _run(self, record: TaskRecord, lease_lost: asyncio.Event) -> None:
        task_id = record.task_id
        crashed = record.crash_error()
        if crashed is not None:
            log.warning("task %s failed: %s", task_id, crashed.message)
            await self._ledger.finish(record, TaskStatus.FAILED, crashed)
            return
        self._metrics.tasks_running.inc()
        try:
            await self._execute(record, lease_lost)
        except TaskCanceled:
            await self._ledger.finish(record, TaskStatus.CANCELED)
        except _ShuttingDown:
            record.requeue("interrupted by a shutdown; resumes from its last finished page")
            await self._ledger.update(record, EventKind.STATUS)
            if self._queue.durable:
                # To another worker now, not after a timeout.
                await self._queue.requeue(task_id, tenant=record.tenant, priority=record.options.priority)
        except (LeaseLost, BackendUnavailable):
            raise  # let go of the task: nothing more is written about it
        except DsocrError as exc:
            log.warning("task %s failed: %s", task_id, exc.message)
            await self._ledger.finish(
                record, TaskStatus.FAILED, TaskErrorInfo(code=exc.code, message=exc.message)
            )
        except Exception as exc:
            log.exception("task %s failed unexpectedly", task_id)
            await self._ledger.finish(
                record,
                TaskStatus.FAILED,
                TaskErrorInfo(
                    code="internal_error", message=f"unexpected error: {type(exc).__name__}: {exc}"
                ),
            )
        finally:
            self._metrics.tasks_running.dec()
            self._ledger.forget_cancel(task_id)

    async def _execute(self, record: TaskRecord, lease_lost: asyncio.Event) -> None:
        task_id = record.task_id

        def check_interrupt() -> None:
            if lease_lost.is_set():
                raise LeaseLost(f"task {task_id}: the queue gave it to another worker")
            if self._ledger.cancel_requested(task_id):
                raise TaskCanceled("canceled by request")
            if self._stopping:
                raise _ShuttingDown

        async def on_page(page: AssembledPage, seconds: float) -> None:
            record.count_page(
                page.number, truncated=page.truncated, suspect=page.suspect, retries=page.retries
            )
            await self._ledger.page_done(record, number=page.number, index=page.index, seconds=seconds)

        record.progress.pages_done = 0
        record.truncated_pages = []
        record.suspect_pages = record.retries = 0  # counted again as pages are done or read back
        await asyncio.to_thread(functools.partial(self._store.clear_results, task_id, lease=record.lease))
        rungs = ladder(record.options, self._config.engine)
        async with self._input_file(record) as input_path:
            job = PageJob(
                task_id=task_id,
                input_path=input_path,
                kind=record.input_kind,
                page_numbers=record.page_numbers,
                dpi=record.options.dpi,
                max_pixels=self._config.max_pixels,
                batch_size=self._config.batch_size,
                recognize=rungs[0].options,
                lease=record.lease,
                retries=rungs[1:],
                max_retries=self._config.page_retries,
                min_agreement=self._config.quality_min_agreement,
            )
            pages = await self._pipeline.run(job, on_page=on_page, check_interrupt=check_interrupt)
        with pages:
            await asyncio.to_thread(self._pipeline.write_outputs, task_id, pages, record.lease)
            record.images = list(pages.images)
            record.model = self._models.state.model
            await self._ledger.finish(
                record, TaskStatus.SUCCEEDED, before_save=lambda final: self._write_result_json(final, pages)
            )

    @contextlib.asynccontextmanager
    async def _input_file(self, record: TaskRecord) -> AsyncIterator[Path]:
        """The store's ``input_file``, entered and left in a thread: a shared store downloads it."""
        lent = self._store.input_file(record)
        path = await asyncio.to_thread(lent.__enter__)
        try:
            yield path
        finally:
            await asyncio.to_thread(lent.__exit__, None, None, None)

    async def _write_result_json(self, record: TaskRecord, pages: AssembledPages) -> None:
        """``result.json``: the view of the succeeded ``record``, with every page, streamed."""
        view = TaskView.from_record(record).model_dump(mode="json", by_alias=True)
        await asyncio.to_thread(
            self._store.write_result,
            record.task_id,
            "result.json",
            pages.result_chunks(view),
            lease=record.lease,
        )
