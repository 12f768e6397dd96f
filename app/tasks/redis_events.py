"""The shared ``EventHub``: one Redis Stream per task, so events published by the worker running
a task reach followers on any API replica.

An event's stream id is ``<event id>-0``: the task's own counter (``app.tasks.events``) becomes the
entry id, so "the events after N" is ``XREAD`` from ``N-0`` and ids keep increasing across processes
and restarts. A stream holds ``HELD_PER_TASK`` events and is dropped ``KEEP_SECONDS`` after the
task's end. Each follower waits in its own ``XREAD BLOCK`` on a pooled connection: no polling, no
thread, at the price of one Redis connection per open stream.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import redis.asyncio
from redis.exceptions import ResponseError

from app.storage.redis_conn import translated
from app.tasks.events import EventKind, TaskEvent

PREFIX = "dsocr:events:"
HELD_PER_TASK = 10_000
KEEP_SECONDS = 300
BLOCK_MS = 10_000  # a follower's read returns at least this often, so a dead connection shows


def _key(task_id: str) -> str:
    return f"{PREFIX}{task_id}"


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> TaskEvent:
    return TaskEvent(
        id=int(entry_id.split(b"-", 1)[0]),
        kind=EventKind(fields[b"kind"].decode()),
        data=fields[b"data"].decode(),
    )


class RedisEventHub:
    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._redis = client

    async def publish(self, task_id: str, event: TaskEvent) -> None:
        key = _key(task_id)
        with translated(f"publishing an event of task {task_id}"):
            try:
                async with self._redis.pipeline(transaction=True) as pipe:
                    pipe.xadd(
                        key,
                        {"kind": event.kind.value, "data": event.data},
                        id=f"{event.id}-0",
                        maxlen=HELD_PER_TASK,
                        approximate=True,
                    )
                    if event.kind is EventKind.END:
                        pipe.expire(key, KEEP_SECONDS)
                    await pipe.execute()
            except ResponseError as exc:  # "equal or smaller than the target stream top item"
                raise ValueError(f"event {event.id} of task {task_id} is not after the last one") from exc

    async def oldest(self, task_id: str) -> int | None:
        with translated(f"reading the events of task {task_id}"):
            first = await self._redis.xrange(_key(task_id), count=1)
        return _event(*first[0]).id if first else None

    async def follow(self, task_id: str, after: int) -> AsyncGenerator[TaskEvent, None]:
        key = _key(task_id)
        cursor = f"{after}-0"
        while True:
            with translated(f"following task {task_id}"):
                reply = await self._redis.xread({key: cursor}, block=BLOCK_MS, count=100)
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    event = _event(entry_id, fields)
                    yield event
                    if event.kind is EventKind.END:
                        return
                    cursor = entry_id.decode()
