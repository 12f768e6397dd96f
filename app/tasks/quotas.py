"""A tenant's quotas checked when it submits a task: tasks queued at once and pages per UTC day.

``Quotas.admit`` runs once a submit knows its page count and before anything is stored: it checks
both limits and counts the task against them in one atomic step, or raises ``QuotaExceeded``
(429, with the IETF RateLimit fields) having counted nothing. If the submit fails later (the queue
is full, the store refuses), ``Quotas.release`` takes back what ``admit`` counted: nothing is left
behind on refusal. The other limits of ``app.tenants.Limits`` apply elsewhere: ``max_upload_mb`` in
the body-limit middleware and the intake, ``max_pages`` in the document check, ``event_streams`` in
``app.api.stream_caps``, ``running_tasks`` where workers take tasks from the queue.

What is counted, per tenant:

- **queued tasks**: the ids of its tasks admitted and not yet seen to leave ``queued``. Nothing has
  to tell the quotas when a task starts, ends or is canceled: each ``admit`` first drops the ids
  whose record says they are no longer queued (or whose record is gone), so the count is the
  records' truth. An id admitted moments ago whose record is not stored yet counts as queued until
  ``PENDING_SECONDS`` have passed (a submit that died half-way frees its place then).
- **pages per day**: the pages of the task's selection, added to the tenant's count for the UTC day
  of the clock; the count resets at 00:00 UTC.

Every tenant is counted, limited or not, so a limit added by a reload of the tenants file applies
to what the tenant already has queued and submitted today.

Two books keep the counts: ``MemoryBook`` in this process (the in-memory queue), and
``app.tasks.redis_quotas.RedisBook`` in Redis, where the whole check-and-count is one Lua script,
so API replicas sharing Redis never admit past a limit together.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from app.errors import QuotaExceeded, TaskNotFound
from app.records import TaskStatus
from app.storage.base import TaskStore
from app.tenants import Tenant

DAY_SECONDS = 86_400
# A task admitted whose record has not appeared after this long belongs to a submit that died
# between the admission and the store (a killed process): it stops counting as queued. Longer
# than storing any upload takes.
PENDING_SECONDS = 600


@dataclass(frozen=True)
class Admission:
    """What ``Quotas.admit`` counted for one task, to give back with ``Quotas.release``."""

    tenant: str
    task_id: str
    pages: int
    day: str  # the UTC day the pages were counted on, YYYY-MM-DD


@dataclass(frozen=True)
class Verdict:
    """A book's answer: ``refused`` is ``None`` (admitted and counted) or the limit that refused,
    with ``used``, what the tenant had of it before this task."""

    refused: str | None
    used: int


class QuotaBook(Protocol):
    """Where the counts live. ``admit`` is atomic: no two calls both take the last place."""

    async def admit(
        self,
        tenant: str,
        task_id: str,
        *,
        pages: int,
        day: str,
        queued_limit: int | None,
        pages_limit: int | None,
        now: float,
        count: bool = True,
    ) -> Verdict:
        """Drop the tenant's ids no longer queued (module docstring); refuse (``queued_tasks``) when
        ``queued_limit`` ids remain, or (``pages_per_day``) when ``pages`` more would pass
        ``pages_limit`` on ``day``; else add ``task_id`` (pending until ``now`` +
        ``PENDING_SECONDS``) and the pages, unless ``count`` is false (a check before the upload is
        read). ``None`` limits are not checked; counted all the same."""

    async def release(self, admission: Admission) -> None:
        """Take back what an admission counted."""

    async def close(self) -> None:
        """Let go of connections."""


class Quotas:
    """Checks a tenant's queued-task and page-per-day limits at submit (module docstring).

    ``clock`` gives the time in seconds since the epoch (``time.time``): the UTC day pages count
    on. It may be replaced at any time (a test crosses a day boundary without waiting for one).
    """

    def __init__(self, book: QuotaBook, *, clock: Callable[[], float] = time.time) -> None:
        self._book = book
        self.clock = clock

    async def check(self, tenant: Tenant, *, queued_retry_after: int) -> None:
        """Raise ``QuotaExceeded`` when ``tenant`` could submit no task now: at its queued-task
        limit, or with no page left today. Counts nothing: for refusing before an upload is read
        (``admit`` decides, atomically, once its pages are known)."""
        await self._decide(tenant, "", pages=1, queued_retry_after=queued_retry_after, count=False)

    async def admit(self, tenant: Tenant, task_id: str, *, pages: int, queued_retry_after: int) -> Admission:
        """Count ``task_id`` and its ``pages`` against ``tenant``'s limits, or raise ``QuotaExceeded``
        counting nothing. ``queued_retry_after``: seconds after which one of the tenant's queued tasks
        has likely started (the queue's estimate), the retry hint of a ``queued_tasks`` refusal."""
        day = await self._decide(
            tenant, task_id, pages=pages, queued_retry_after=queued_retry_after, count=True
        )
        return Admission(tenant=tenant.name, task_id=task_id, pages=pages, day=day)

    async def _decide(
        self, tenant: Tenant, task_id: str, *, pages: int, queued_retry_after: int, count: bool
    ) -> str:
        """Ask the book; raise its refusal as ``QuotaExceeded``; the UTC day it counted on."""
        now = self.clock()
        moment = datetime.fromtimestamp(now, UTC)
        day = moment.date().isoformat()
        limits = tenant.limits
        verdict = await self._book.admit(
            tenant.name,
            task_id,
            pages=pages,
            day=day,
            queued_limit=limits.queued_tasks,
            pages_limit=limits.pages_per_day,
            now=now,
            count=count,
        )
        if verdict.refused == "queued_tasks":
            assert limits.queued_tasks is not None
            raise QuotaExceeded(
                f"tenant {tenant.name!r} has {verdict.used} tasks queued, its limit (queued_tasks "
                f"{limits.queued_tasks}); retry once one of them has started",
                limit="queued_tasks",
                quota=limits.queued_tasks,
                retry_after=queued_retry_after,
            )
        if verdict.refused == "pages_per_day":
            assert limits.pages_per_day is not None
            midnight = datetime.combine(moment.date() + timedelta(days=1), datetime.min.time(), UTC)
            reset = max(1, math.ceil(midnight.timestamp() - now))
            left = max(0, limits.pages_per_day - verdict.used)
            raise QuotaExceeded(
                f"tenant {tenant.name!r} has submitted {verdict.used} pages today (UTC); {pages} more "
                f"would pass its limit (pages_per_day {limits.pages_per_day}), which resets at "
                f"{midnight.isoformat()}",
                limit="pages_per_day",
                quota=limits.pages_per_day,
                retry_after=reset,
                remaining=left,
                window_seconds=DAY_SECONDS,
            )
        return day

    async def release(self, admission: Admission) -> None:
        """Take back an admission whose task was not stored; shielded, as it runs on the way out
        of a failed (possibly cancelled) submit."""
        await asyncio.shield(self._book.release(admission))

    async def close(self) -> None:
        await self._book.close()


@dataclass
class _TenantCounts:
    queued: dict[str, float] = field(default_factory=dict)  # task id -> pending until (epoch s)
    pages: dict[str, int] = field(default_factory=dict)  # UTC day -> pages


class MemoryBook:
    """The counts in this process, for the in-memory queue; the record statuses come from ``store``.

    Used from the event loop only: the check and the count run with no ``await`` between them.
    """

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self._tenants: dict[str, _TenantCounts] = {}

    async def admit(
        self,
        tenant: str,
        task_id: str,
        *,
        pages: int,
        day: str,
        queued_limit: int | None,
        pages_limit: int | None,
        now: float,
        count: bool = True,
    ) -> Verdict:
        counts = self._tenants.setdefault(tenant, _TenantCounts())
        gone = await asyncio.to_thread(self._left_queue, dict(counts.queued), now)  # reads records
        for task in gone:
            counts.queued.pop(task, None)
        # From here to the end nothing awaits: the check and the count are one step on the loop.
        if queued_limit is not None and len(counts.queued) >= queued_limit:
            return Verdict("queued_tasks", len(counts.queued))
        used = counts.pages.get(day, 0)
        if pages_limit is not None and used + pages > pages_limit:
            return Verdict("pages_per_day", used)
        if not count:
            return Verdict(None, used)
        counts.queued[task_id] = now + PENDING_SECONDS
        counts.pages = {day: used + pages}  # earlier days are over
        return Verdict(None, used)

    def _left_queue(self, queued: dict[str, float], now: float) -> list[str]:
        gone = []
        for task_id, pending_until in queued.items():
            try:
                status = self._store.load(task_id).status
            except TaskNotFound:
                if pending_until < now:
                    gone.append(task_id)
                continue
            if status is not TaskStatus.QUEUED:
                gone.append(task_id)
        return gone

    async def release(self, admission: Admission) -> None:
        counts = self._tenants.get(admission.tenant)
        if counts is None:
            return
        counts.queued.pop(admission.task_id, None)
        if admission.day in counts.pages:
            counts.pages[admission.day] = max(0, counts.pages[admission.day] - admission.pages)

    async def close(self) -> None:
        return None
