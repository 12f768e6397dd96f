"""Usage: what each tenant's tasks and downloads cost, per UTC day.

What is counted, and when:

- A task, once, when it ends (any final status), on the day it ended: its pages, tokens and
  engine seconds, summed from ``raw/`` (``UsageMeter.measure``), and its input's size. Raw files
  are the per-page truth that survives restarts: a page is recognised once and read back by every
  later start of its task, and each retry rung keeps a file of its own, so summing them at the end
  counts every recognition exactly once however many starts the task took (counting as pages
  complete would count read-back pages again, or need the same files to tell them apart). The sum
  is written after the task's final record is saved, which happens once per task (a shared store
  fences it with the lease): a process killed between that save and this write loses the task's
  figures (milliseconds); nothing is ever counted twice.
- Bytes out: every byte of a result the service streams (``served``), on the day it was sent,
  tallied in memory and written every few seconds (``run_flusher``) and at shutdown. Downloads the
  bucket serves itself (``APP_S3_REDIRECT_DOWNLOADS``) are the bucket's to count.

Where: ``SqliteUsage`` (a file under the data directory, one process) or ``RedisUsage`` (hashes,
incremented atomically by every process of a scale-out). Days older than ``KEEP_DAYS`` are dropped.
The metrics ``dsocr_tenant_*`` count the same figures per process, labelled by tenant names from
the tenants registry only (anything else is ``other``), so the label set stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import redis

from app.errors import BackendUnavailable
from app.metrics import Metrics
from app.records import TaskRecord, TaskUsage
from app.storage.base import TaskStore
from app.storage.redis_conn import translated
from app.tenants import Tenants

log = logging.getLogger(__name__)

KEEP_DAYS = 400  # longer than the widest window GET /v1/usage answers (366 days)
# Rung 0 and the retry rungs a page may climb (app.tasks.options.ladder lists at most five).
MAX_RUNGS = 5
NO_TENANT = "-"  # how tasks without a tenant are stored; no tenant name can take it
OTHER_LABEL = "other"  # the metrics label of a tenant the registry does not list


@dataclass(frozen=True)
class Figures:
    """One tenant's usage over some span (a day, or a total)."""

    tasks: int = 0
    pages: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            *(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True))
        )


FIELDS = tuple(f.name for f in dataclasses.fields(Figures))
Report = dict[str | None, dict[date, Figures]]  # tenant (None: no tenant) -> day -> figures

# SQLite statements: the column names are FIELDS (this module's constants); every value is a parameter.
_COLUMNS = ", ".join(FIELDS)
_CREATE = (
    "CREATE TABLE IF NOT EXISTS usage (day TEXT NOT NULL, tenant TEXT NOT NULL, "
    + ", ".join(f"{f} {'REAL' if f == 'engine_seconds' else 'INTEGER'} NOT NULL DEFAULT 0" for f in FIELDS)
    + ", PRIMARY KEY (day, tenant))"
)
_ADD = (
    f"INSERT INTO usage (day, tenant, {_COLUMNS}) VALUES (?, ?{', ?' * len(FIELDS)}) "  # noqa: S608
    "ON CONFLICT (day, tenant) DO UPDATE SET " + ", ".join(f"{f} = {f} + excluded.{f}" for f in FIELDS)
)
_READ = f"SELECT day, tenant, {_COLUMNS} FROM usage WHERE day BETWEEN ? AND ?"  # noqa: S608


def _key(tenant: str | None) -> str:
    return NO_TENANT if tenant is None else tenant


def _tenant(key: str) -> str | None:
    return None if key == NO_TENANT else key


class UsageStore(Protocol):
    """Daily totals per tenant. Blocking: call from threads. Both raise ``BackendUnavailable``
    when their backend cannot be reached."""

    def add(self, tenant: str | None, day: date, figures: Figures) -> None:
        """Add ``figures`` to ``tenant``'s totals of ``day``, atomically."""

    def read(self, first: date, last: date, tenants: Collection[str | None] | None) -> Report:
        """The days from ``first`` to ``last`` (inclusive) with any usage, of ``tenants`` (``None``:
        every tenant that has some)."""


class SqliteUsage:
    """``UsageStore`` in an SQLite file: one process's, surviving its restarts. A connection per
    call (calls are rare: a task's end, a flush every few seconds, a report)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_CREATE)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=30)
        try:
            with db:  # one transaction: committed on success, rolled back on error
                yield db
        finally:
            db.close()

    def add(self, tenant: str | None, day: date, figures: Figures) -> None:
        with self._connect() as db:
            db.execute(_ADD, (day.isoformat(), _key(tenant), *dataclasses.astuple(figures)))
            db.execute("DELETE FROM usage WHERE day < ?", ((day - timedelta(days=KEEP_DAYS)).isoformat(),))

    def read(self, first: date, last: date, tenants: Collection[str | None] | None) -> Report:
        query = _READ
        params: list[str] = [first.isoformat(), last.isoformat()]
        if tenants is not None:
            query += f" AND tenant IN ({', '.join('?' * len(tenants))})"  # a placeholder each
            params += [_key(t) for t in tenants]
        report: Report = {}
        with self._connect() as db:
            for day, tenant, *values in db.execute(query, params):
                report.setdefault(_tenant(tenant), {})[date.fromisoformat(day)] = Figures(*values)
        return report


class RedisUsage:
    """``UsageStore`` in Redis, shared by every process: a hash per tenant and day
    (``dsocr:usage:<day>:<tenant>``, incremented with HINCRBY / HINCRBYFLOAT) and a set per day of
    the tenants with usage (``dsocr:usage:<day>``), all expiring after ``KEEP_DAYS``."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client

    def add(self, tenant: str | None, day: date, figures: Figures) -> None:
        figures_key, day_key = (
            f"dsocr:usage:{day.isoformat()}:{_key(tenant)}",
            f"dsocr:usage:{day.isoformat()}",
        )
        ttl = int(timedelta(days=KEEP_DAYS).total_seconds())
        with translated("recording usage"), self._redis.pipeline(transaction=True) as pipe:
            for name, value in zip(FIELDS, dataclasses.astuple(figures), strict=True):
                if value:
                    if isinstance(value, float):
                        pipe.hincrbyfloat(figures_key, name, value)
                    else:
                        pipe.hincrby(figures_key, name, value)
            pipe.sadd(day_key, _key(tenant))
            pipe.expire(figures_key, ttl)
            pipe.expire(day_key, ttl)
            pipe.execute()

    def read(self, first: date, last: date, tenants: Collection[str | None] | None) -> Report:
        days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
        with translated("reading usage"):
            if tenants is None:
                with self._redis.pipeline(transaction=False) as pipe:
                    for day in days:
                        pipe.smembers(f"dsocr:usage:{day.isoformat()}")
                    members = pipe.execute()
                wanted = [
                    (day, name.decode()) for day, names in zip(days, members, strict=True) for name in names
                ]
            else:
                wanted = [(day, _key(tenant)) for day in days for tenant in tenants]
            with self._redis.pipeline(transaction=False) as pipe:
                for day, name in wanted:
                    pipe.hgetall(f"dsocr:usage:{day.isoformat()}:{name}")
                found = pipe.execute()
        report: Report = {}
        for (day, name), values in zip(wanted, found, strict=True):
            if values:
                fields = {key.decode(): value.decode() for key, value in values.items()}
                counts = {f: int(fields.get(f, 0)) for f in FIELDS if f != "engine_seconds"}
                seconds = float(fields.get("engine_seconds", 0.0))
                report.setdefault(_tenant(name), {})[day] = Figures(**counts, engine_seconds=seconds)
        return report


def utc_today() -> date:
    return datetime.now(UTC).date()


class UsageMeter:
    """Measures and records usage (module docstring); one per process, built in ``create_app``."""

    def __init__(
        self,
        *,
        usage: UsageStore,
        store: TaskStore,
        metrics: Metrics,
        tenants: Tenants,
        today: Callable[[], date] = utc_today,
    ) -> None:
        self.usage = usage
        self._store = store
        self._metrics = metrics
        self._tenants = tenants
        self._today = today
        self._lock = threading.Lock()  # ``served`` runs on the loop and in threads
        self._served: dict[tuple[str | None, date], int] = {}  # bytes out not written yet

    # --- tasks ---

    def measure(self, record: TaskRecord) -> TaskUsage:
        """What ``record`` cost so far, from its ``raw/`` files and its input (blocking: one read
        per page, more for a task that ran retry rungs; none for a task that never started)."""
        pages = prompt = completion = 0
        seconds = 0.0
        rungs = range(MAX_RUNGS) if record.retries else range(1)
        numbers = record.page_numbers if record.attempts else []  # never started: nothing to read
        for number in numbers:
            for rung in rungs:
                raw = self._store.read_raw(record.task_id, number, rung)
                if raw is None:
                    continue
                pages += rung == 0
                prompt += int(raw.get("prompt_tokens", 0))
                completion += int(raw.get("tokens", 0))
                seconds += float(raw.get("seconds", 0.0))
        return TaskUsage(
            pages=pages,
            prompt_tokens=prompt,
            completion_tokens=completion,
            engine_seconds=round(seconds, 3),
            bytes_in=record.source.size_bytes,
        )

    async def task_ended(self, record: TaskRecord) -> None:
        """Record the usage of a task whose final record (with ``usage``) has just been saved. A
        store that cannot be reached is logged, not raised: the task's outcome stands."""
        usage = record.usage or TaskUsage()
        day = (record.finished_at or datetime.now(UTC)).astimezone(UTC).date()
        figures = Figures(
            tasks=1,
            pages=usage.pages,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            engine_seconds=usage.engine_seconds,
            bytes_in=usage.bytes_in,
        )
        label = self.label(record.tenant)
        self._metrics.tenant_pages.labels(label).inc(usage.pages)
        self._metrics.tenant_tokens.labels(label, "prompt").inc(usage.prompt_tokens)
        self._metrics.tenant_tokens.labels(label, "completion").inc(usage.completion_tokens)
        self._metrics.tenant_engine_seconds.labels(label).inc(usage.engine_seconds)
        try:
            await asyncio.to_thread(self.usage.add, record.tenant, day, figures)
        except BackendUnavailable as exc:
            log.warning("task %s: its usage was not recorded: %s", record.task_id, exc.message)

    def label(self, tenant: str | None) -> str:
        """The metrics label of ``tenant``: its name when the registry lists it, else ``other``."""
        return tenant if tenant is not None and tenant in self._tenants.names() else OTHER_LABEL

    # --- downloads ---

    def served(self, tenant: str | None, size: int) -> None:
        """``size`` bytes of a result of ``tenant``'s were sent; never blocks (written by ``flush``)."""
        if size:
            key = (tenant, self._today())
            with self._lock:
                self._served[key] = self._served.get(key, 0) + size

    def flush(self) -> None:
        """Write the bytes served since the last flush (blocking). What cannot be written stays for
        the next flush; raises ``BackendUnavailable`` then."""
        with self._lock:
            pending, self._served = self._served, {}
        for (tenant, day), size in list(pending.items()):
            try:
                self.usage.add(tenant, day, Figures(bytes_out=size))
            except BackendUnavailable:
                with self._lock:
                    for key, left in pending.items():
                        self._served[key] = self._served.get(key, 0) + left
                raise
            del pending[(tenant, day)]

    async def run_flusher(self, every_seconds: float) -> None:
        """``flush`` every ``every_seconds`` until cancelled (a task of the app's lifespan)."""
        while True:
            await asyncio.sleep(every_seconds)
            try:
                await asyncio.to_thread(self.flush)
            except BackendUnavailable as exc:
                log.warning("bytes served not recorded yet, retrying: %s", exc.message)

    # --- reports ---

    async def report(self, first: date, last: date, tenants: Collection[str | None] | None) -> Report:
        """``UsageStore.read``, in a thread, once the bytes this process served are written (so a
        caller sees its own downloads at once; other processes' within ``run_flusher``'s period)."""

        def flushed_read() -> Report:
            self.flush()
            return self.usage.read(first, last, tenants)

        return await asyncio.to_thread(flushed_read)
