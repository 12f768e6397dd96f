"""Where tasks live: one process's memory and disk, or Redis and a bucket shared by many processes.

``APP_QUEUE_BACKEND=memory`` (with ``APP_STORAGE_BACKEND=local``): an in-process queue and event
hub, records and files on the local disk, usage in an SQLite file beside them. ``redis`` (with
``s3``): the queue, records, events and usage in Redis, files in the bucket, so API replicas and
workers on any machine share every task. Settings refuse any other pairing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.metrics import Metrics
from app.storage.base import TaskStore
from app.storage.local import LocalStore
from app.tasks.events import EventHub, MemoryEventHub
from app.tasks.idempotency import KEY_TTL
from app.tasks.queue import MemoryQueue, Shares, TaskQueue
from app.tasks.usage import SqliteUsage, UsageStore


@dataclass
class Backends:
    store: TaskStore
    queue: TaskQueue
    events: EventHub
    usage: UsageStore  # daily usage per tenant (app.tasks.usage)
    _setup: list[Any] = field(default_factory=list)  # coroutines functions to run at start-up
    _closers: list[Any] = field(default_factory=list)  # callables (sync or async) to run at shutdown

    async def start(self) -> None:
        for setup in self._setup:
            await setup()

    async def close(self) -> None:
        for close in self._closers:
            outcome = close()
            if asyncio.iscoroutine(outcome):
                await outcome


def build_backends(settings: Settings, metrics: Metrics, shares: Shares) -> Backends:
    """The store, queue, event hub and usage store the settings name (they are checked to be a
    valid pair); the queue shares the workers among tenants by ``shares``."""
    if settings.queue_backend == "memory":
        return Backends(
            store=LocalStore(settings.data_dir),
            queue=MemoryQueue(settings.queue_max, shares),
            events=MemoryEventHub(),
            usage=SqliteUsage(settings.data_dir / "usage.sqlite3"),
        )
    # Imported here: the one-process default needs neither redis-py nor a bucket client.
    from app.storage.redis_conn import async_client, async_pool_size, sync_client
    from app.storage.redis_records import RedisRecords
    from app.storage.s3 import S3Bucket, s3_bucket_config
    from app.storage.shared import SharedStore
    from app.tasks.redis_events import RedisEventHub
    from app.tasks.redis_queue import RedisQueue
    from app.tasks.usage import RedisUsage

    assert settings.redis_url is not None  # Settings refuses redis without a URL
    records_client = sync_client(settings.redis_url, pool_timeout=settings.redis_pool_timeout_seconds)
    # Bounded: streams and long-polls on an API process (capped, app.api.stream_caps), worker loops.
    streams = settings.max_streams_total if settings.role != "worker" else 0
    workers = settings.max_workers if settings.role != "api" else 0
    stream_client = async_client(
        settings.redis_url,
        max_connections=async_pool_size(streams=streams, workers=workers),
        pool_timeout=settings.redis_pool_timeout_seconds,
    )
    store = SharedStore(
        records=RedisRecords(records_client, idempotency_ttl=KEY_TTL),
        bucket=S3Bucket(s3_bucket_config(settings, max_attempts=5)),
        prefix=settings.s3_prefix,
        spool_dir=settings.data_dir / "spool",
        redirect_seconds=settings.link_expire_seconds if settings.s3_redirect_downloads else 0,
    )
    queue = RedisQueue(
        stream_client,
        maxsize=settings.queue_max,
        visibility_seconds=settings.visibility_timeout_seconds,
        metrics=metrics,
        shares=shares,
    )
    return Backends(
        store=store,
        queue=queue,
        events=RedisEventHub(stream_client),
        usage=RedisUsage(records_client),
        _setup=[queue.setup],
        _closers=[store.close, records_client.close, stream_client.aclose],
    )
