"""The shared queue: a Redis Stream read by one consumer group, for API replicas and workers.

Why Redis Streams consumer groups through redis-py, not arq, saq or taskiq: what this service must
guarantee is stated in the stream's own terms. A delivered entry stays in the group's pending list,
owned by its consumer, until it is acknowledged; ``XAUTOCLAIM`` hands an entry whose owner has been
silent for the visibility timeout to another worker (a SIGKILLed worker's task is redelivered);
renewing is a claim by the owner itself. Persistence is Redis's (the append-only file). The job
libraries wrap the same commands behind retry and result semantics of their own that would sit
between us and the lease the records are fenced with.

Keys (``dsocr:`` first)::

    queue           the stream: one entry {task: <id>} per enqueue; group "workers"
    queued          sorted set: ids waiting -> when they were queued (depth, oldest age, discards)
    reservations    sorted set: submits storing their task -> when their slot lapses

The bound counts ``queued`` plus live reservations, checked and taken in one script, so it holds
across every API replica. A reservation a crashed replica never committed lapses after
``RESERVATION_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import redis.asyncio
from redis.exceptions import ResponseError

from app.errors import QueueFull
from app.metrics import Metrics
from app.storage.redis_conn import translated

log = logging.getLogger(__name__)

PREFIX = "dsocr:"
STREAM = f"{PREFIX}queue"
GROUP = "workers"
QUEUED = f"{PREFIX}queued"
RESERVATIONS = f"{PREFIX}reservations"
RESERVATION_SECONDS = 120  # longer than storing any upload takes
READ_BLOCK_MS = 2000  # a get() wakes at least this often to look for tasks to redeliver

# KEYS: queued, reservations. ARGV: now, bound, token, lapse time. 1: taken; 0: full.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""
# KEYS: stream. ARGV: group, consumer, entry id. Renews the entry only while this consumer owns it.
_TOUCH = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


class _RedisReservation:
    def __init__(self, queue: RedisQueue, token: str) -> None:
        self._queue = queue
        self._token = token
        self._open = True

    async def commit(self, task_id: str) -> None:
        if self._open:
            self._open = False
            await self._queue._enqueue(task_id, reservation=self._token)

    async def release(self) -> None:
        if self._open:
            self._open = False
            with translated("releasing a queue slot"):
                await self._queue._redis.zrem(RESERVATIONS, self._token)


class RedisQueue:
    """``TaskQueue`` on a Redis Stream; one instance per process, named as a consumer."""

    durable = True

    def __init__(
        self, client: redis.asyncio.Redis, *, maxsize: int, visibility_seconds: float, metrics: Metrics
    ) -> None:
        self.maxsize = maxsize
        self._redis = client
        self._visibility_ms = max(int(visibility_seconds * 1000), 1)
        self._metrics = metrics
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._entries: dict[str, bytes] = {}  # task id -> its stream entry, while this worker holds it
        self._reserve = client.register_script(_RESERVE)
        self._touch = client.register_script(_TOUCH)

    async def setup(self) -> None:
        """Create the stream and its group if they do not exist (every process may; one wins).

        The group starts at the stream's beginning, so tasks accepted before the first worker ever
        started are delivered too.
        """
        with translated("creating the queue"):
            try:
                await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def reserve(self) -> _RedisReservation:
        token = uuid.uuid4().hex
        now = time.time()
        with translated("reserving a queue slot"):
            taken = await self._reserve(
                keys=[QUEUED, RESERVATIONS], args=[now, self.maxsize, token, now + RESERVATION_SECONDS]
            )
        if not taken:
            raise QueueFull(f"the queue is full ({self.maxsize} tasks waiting)", retry_after=0)
        return _RedisReservation(self, token)

    async def requeue(self, task_id: str) -> None:
        await self._enqueue(task_id, reservation=None)

    async def _enqueue(self, task_id: str, *, reservation: str | None) -> None:
        with translated(f"queueing task {task_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                if reservation is not None:
                    pipe.zrem(RESERVATIONS, reservation)
                pipe.zadd(QUEUED, {task_id: time.time()}, nx=True)
                pipe.xadd(STREAM, {"task": task_id})
                await pipe.execute()

    async def get(self) -> str:
        """The next task: first one whose worker went silent past the visibility timeout, else a
        new one, waiting as long as it takes."""
        while True:
            with translated("waiting for a task"):
                entry = await self._redeliverable()
                if entry is None:
                    entry = await self._next_new()
            if entry is not None:
                entry_id, task_id = entry
                self._entries[task_id] = entry_id
                with translated(f"taking task {task_id}"):
                    await self._redis.zrem(QUEUED, task_id)
                return task_id

    async def _redeliverable(self) -> tuple[bytes, str] | None:
        _, claimed, _ = await self._redis.xautoclaim(
            STREAM, GROUP, self.consumer, min_idle_time=self._visibility_ms, start_id="0-0", count=1
        )
        if not claimed:
            return None
        entry_id, fields = claimed[0]
        task_id = fields[b"task"].decode()
        self._metrics.redeliveries.inc()
        seconds = self._visibility_ms / 1000
        log.warning("task %s: its worker went silent for %.0f s; delivered again", task_id, seconds)
        return entry_id, task_id

    async def _next_new(self) -> tuple[bytes, str] | None:
        reply = await self._redis.xreadgroup(
            GROUP, self.consumer, {STREAM: ">"}, count=1, block=READ_BLOCK_MS
        )
        if not reply:
            return None
        _, entries = reply[0]
        entry_id, fields = entries[0]
        return entry_id, fields[b"task"].decode()

    async def touch(self, task_id: str) -> bool:
        entry_id = self._entries.get(task_id)
        if entry_id is None:
            return False
        with translated(f"renewing the lease on task {task_id}"):
            return bool(await self._touch(keys=[STREAM], args=[GROUP, self.consumer, entry_id]))

    async def ack(self, task_id: str) -> None:
        entry_id = self._entries.pop(task_id, None)
        if entry_id is None:
            return
        with translated(f"acknowledging task {task_id}"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xack(STREAM, GROUP, entry_id)
                pipe.xdel(STREAM, entry_id)
                await pipe.execute()

    def forget(self, task_id: str) -> None:
        """Let go of a task without acknowledging it: another worker holds it now, or will."""
        self._entries.pop(task_id, None)

    async def discard(self, task_id: str) -> None:
        # The stream entry stays; the worker it reaches finds the task canceled and skips it.
        with translated(f"discarding task {task_id}"):
            await self._redis.zrem(QUEUED, task_id)

    async def position(self, task_id: str) -> int | None:
        with translated("reading the queue"):
            rank = await self._redis.zrank(QUEUED, task_id)
        return None if rank is None else int(rank) + 1

    async def depth(self) -> int:
        with translated("reading the queue depth"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zcard(QUEUED)
                pipe.zcount(RESERVATIONS, time.time(), "+inf")
                queued, reserved = await pipe.execute()
        return int(queued) + int(reserved)

    async def oldest_age(self) -> float:
        with translated("reading the queue"):
            oldest = await self._redis.zrange(QUEUED, 0, 0, withscores=True)
        return max(time.time() - oldest[0][1], 0.0) if oldest else 0.0

    async def full(self) -> bool:
        return await self.depth() >= self.maxsize
