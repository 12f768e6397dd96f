"""What happens after a task ends, in the background: publishing its results, then its webhook.

When a task ends, ``plan`` marks on its record what is due (a publish, with ``APP_AUTO_PUBLISH``
and success; a webhook, when it has a ``callback_url``) before that final record is saved, and
``launch`` starts the work once it is. The publish runs first so the webhook carries its links.
Neither can delay the task's end, change its status or touch its results: a publish or delivery
that fails is recorded on ``record.publish`` / ``record.webhook`` and nowhere else.

A webhook is signed with the secret of the task's tenant (``webhook_secret`` in the tenants file)
where it has one, else with ``APP_WEBHOOK_SECRET``, looked up when the delivery starts, so a
rotated secret applies to deliveries still to come; a task whose tenant has no secret and a service
without ``APP_WEBHOOK_SECRET`` cannot carry a ``callback_url``.

Once a task is final, only this class writes its record, under one lock, so a publish and a
delivery of the same task never overwrite each other. Work cut short by a shutdown stays
``pending`` or ``running`` on disk and ``resume`` starts it again at the next start.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from app.errors import DsocrError, InvalidOptions, PublishFailed, RecordChanged
from app.metrics import Metrics
from app.records import (
    DeliveryStatus,
    PublishState,
    TaskErrorInfo,
    TaskRecord,
    TaskStatus,
    WebhookState,
)
from app.storage.base import TaskStore
from app.storage.publish import Publisher
from app.storage.webhooks import Attempt, WebhookSender, check_callback_url
from app.tasks.downloads import Exports
from app.tenants import Tenants
from app.views import TaskView

log = logging.getLogger(__name__)

_UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.RUNNING)
_UPDATE_TRIES = 5  # writes of one change, while other processes keep changing the record first


class FollowUps:
    """Publishes results and delivers webhooks for finished tasks, never failing the task itself."""

    def __init__(
        self,
        *,
        store: TaskStore,
        publisher: Publisher,
        webhooks: WebhookSender | None,
        auto_publish: bool,
        metrics: Metrics,
        webhook_secret: bytes | None = None,
        tenants: Tenants | None = None,
    ) -> None:
        """``webhooks``: the sender (``None``: no webhooks at all); ``webhook_secret``
        (``APP_WEBHOOK_SECRET``) signs the deliveries of tasks whose tenant in ``tenants`` has no
        secret of its own."""
        self._store = store
        self._metrics = metrics
        self._publisher = publisher
        self._exports = Exports(store)  # what a bucket publish uploads beside the stored files
        self._webhooks = webhooks
        self._webhook_secret = webhook_secret
        self._tenants = tenants
        self._auto_publish = auto_publish
        self._lock = asyncio.Lock()
        self._jobs: set[asyncio.Task[None]] = set()
        self._publishing: dict[str, asyncio.Task[PublishState]] = {}  # one publish per task at a time

    # --- at submit ---

    async def check_callback(self, url: str, tenant: str | None = None) -> None:
        """Refuse a ``callback_url`` this service cannot deliver to or sign for ``tenant``; raises
        before anything is stored."""
        if self._webhooks is None or self.secret_for(tenant) is None:
            raise InvalidOptions(
                "callback_url needs a secret to sign webhooks with: APP_WEBHOOK_SECRET on the server, "
                "or a webhook_secret of the tenant in APP_TENANTS_FILE"
            )
        await check_callback_url(url, allow_private=self._webhooks.allow_private)

    def secret_for(self, tenant: str | None) -> bytes | None:
        """The key that signs ``tenant``'s webhooks: its own, else ``APP_WEBHOOK_SECRET``, else none."""
        found = self._tenants.get(tenant) if self._tenants is not None and tenant is not None else None
        if found is not None and found.webhook_secret is not None:
            return found.webhook_secret.get_secret_value().encode()
        return self._webhook_secret

    # --- when a task ends ---

    def plan(self, record: TaskRecord) -> bool:
        """Mark what is due on a record about to be saved as final; whether anything is."""
        due = False
        if self._auto_publish and record.status is TaskStatus.SUCCEEDED:
            record.publish = PublishState(status=DeliveryStatus.PENDING, backend=self._publisher.backend)
            due = True
        if record.options.callback_url is not None:
            record.webhook = WebhookState(status=DeliveryStatus.PENDING, delivery_id=uuid.uuid4().hex)
            due = True
        return due

    def launch(self, task_id: str) -> None:
        """Start the work ``plan`` marked, in the background; returns at once."""
        job = asyncio.create_task(self._follow_up(task_id), name=f"dsocr-followup-{task_id}")
        self._jobs.add(job)
        job.add_done_callback(self._job_ended)

    def _job_ended(self, job: asyncio.Task[None]) -> None:
        self._jobs.discard(job)
        if not job.cancelled() and job.exception() is not None:
            log.error("follow-up %s crashed", job.get_name(), exc_info=job.exception())

    # --- on request ---

    async def publish(self, task_id: str) -> PublishState:
        """Publish a succeeded task's results now and return the links.

        Joins a publish of the same task already under way instead of starting a second one.
        Raises ``TaskNotFinished`` unless the task succeeded, ``PublishFailed`` when it fails
        (recorded on the task as well).
        """
        record = await asyncio.to_thread(self._store.load, task_id)
        record.require_succeeded()
        state = await self._publish_once(task_id)
        if state.status is DeliveryStatus.FAILED:
            raise PublishFailed(state.error.message if state.error else "the publish failed")
        return state

    # --- lifecycle ---

    def unfinished(self) -> list[str]:
        """Ids of final tasks whose publish or webhook a stopped process left unfinished (blocking)."""
        return [
            record.task_id
            for record in self._store.list_records()
            if record.status.is_final
            and any(state and state.status in _UNFINISHED for state in (record.publish, record.webhook))
        ]

    async def stop(self) -> None:
        """Cancel what is under way; it stays unfinished on disk and resumes at the next start."""
        for job in (*self._jobs, *self._publishing.values()):
            job.cancel()
        await asyncio.gather(*self._jobs, *self._publishing.values(), return_exceptions=True)
        self._publisher.close()

    # --- the work ---

    async def _follow_up(self, task_id: str) -> None:
        try:
            record = await asyncio.to_thread(self._store.load, task_id)
            if record.publish is not None and record.publish.status in _UNFINISHED:
                await self._publish_once(task_id)
            if record.webhook is not None and record.webhook.status in _UNFINISHED:
                await self._deliver(task_id)
        except DsocrError as exc:  # the task expired (was deleted) meanwhile, or its record is unwritable
            log.warning("follow-up of task %s stopped: %s", task_id, exc.message)

    async def _publish_once(self, task_id: str) -> PublishState:
        running = self._publishing.get(task_id)
        if running is None:
            running = asyncio.create_task(self._run_publish(task_id), name=f"dsocr-publish-{task_id}")
            self._publishing[task_id] = running

            def forget(done: asyncio.Task[PublishState]) -> None:
                if self._publishing.get(task_id) is done:
                    del self._publishing[task_id]

            running.add_done_callback(forget)
        # Shielded: a client that hangs up on POST /publish must not abort the publish it started.
        return await asyncio.shield(running)

    async def _run_publish(self, task_id: str) -> PublishState:
        backend = self._publisher.backend
        running = PublishState(status=DeliveryStatus.RUNNING, backend=backend)
        record = await self._update(task_id, lambda r: setattr(r, "publish", running))
        try:
            state = await self._publisher.publish(record, self._exports)
        except DsocrError as exc:  # PublishFailed, or a result file gone (the task expired meanwhile)
            log.warning("publishing task %s failed: %s", task_id, exc.message)
            state = self._failed_publish(exc.code, exc.message)
        except Exception as exc:  # a bug must not leave the publish "running" for ever
            log.exception("publishing task %s failed unexpectedly", task_id)
            state = self._failed_publish("internal_error", f"unexpected error: {type(exc).__name__}")
        await self._update(task_id, lambda r: setattr(r, "publish", state))
        self._metrics.publishes.labels(backend, state.status.value).inc()
        if state.status is DeliveryStatus.SUCCEEDED:
            log.info("task %s published to %s (%d files)", task_id, backend, len(state.links))
        return state

    def _failed_publish(self, code: str, message: str) -> PublishState:
        return PublishState(
            status=DeliveryStatus.FAILED,
            backend=self._publisher.backend,
            error=TaskErrorInfo(code=code, message=message),
            finished_at=datetime.now(UTC),
        )

    async def _deliver(self, task_id: str) -> None:
        def start(record: TaskRecord) -> None:
            assert record.webhook is not None
            record.webhook.status = DeliveryStatus.RUNNING

        record = await self._update(task_id, start)
        assert record.webhook is not None
        assert record.options.callback_url is not None
        secret = self.secret_for(record.tenant)
        if self._webhooks is None or secret is None:  # the secret was removed since the task was accepted
            await self._end_delivery(
                task_id,
                None,
                "no secret to sign with any more (APP_WEBHOOK_SECRET, the tenant's webhook_secret)",
            )
            return
        body = TaskView.from_record(record).model_dump_json(by_alias=True).encode()

        async def record_attempt(attempt: Attempt) -> None:
            def note(r: TaskRecord) -> None:
                assert r.webhook is not None
                r.webhook.attempts += 1
                r.webhook.response_status = attempt.status_code

            await self._update(task_id, note)

        last = await self._webhooks.deliver(
            record.options.callback_url,
            body,
            secret=secret,
            event=f"task.{record.status.value}",
            delivery_id=record.webhook.delivery_id,
            on_attempt=record_attempt,
        )
        await self._end_delivery(task_id, last.status_code, None if last.delivered else last.error)

    async def _end_delivery(self, task_id: str, status_code: int | None, error: str | None) -> None:
        def end(record: TaskRecord) -> None:
            assert record.webhook is not None
            record.webhook.status = DeliveryStatus.FAILED if error else DeliveryStatus.SUCCEEDED
            record.webhook.response_status = status_code
            record.webhook.error = TaskErrorInfo(code="webhook_failed", message=error) if error else None
            record.webhook.finished_at = datetime.now(UTC)

        await self._update(task_id, end)
        self._metrics.webhook_deliveries.labels("failed" if error else "succeeded").inc()
        if error:
            log.warning("webhook of task %s failed: %s", task_id, error)

    async def _update(self, task_id: str, change: Callable[[TaskRecord], None]) -> TaskRecord:
        """Load, change and save a final task's record under the lock; the save survives cancellation.

        Another process may update the same record (a shared store: a publish asked of an API
        replica while the worker delivers the webhook); its write wins the race, and the change is
        made again on the record as it is now.
        """
        tries = 0
        async with self._lock:
            while True:
                tries += 1
                record = await asyncio.to_thread(self._store.load, task_id)
                change(record)
                try:
                    await asyncio.shield(asyncio.to_thread(self._store.save, record))
                except RecordChanged:
                    if tries == _UPDATE_TRIES:
                        raise
                    continue
                return record
