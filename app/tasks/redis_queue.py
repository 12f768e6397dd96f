"""The shared queue: the fair-share schedule of ``app.tasks.queue`` in Redis, for API replicas and
workers on several machines.

Why per-tenant lines and Lua scripts, not one Redis Stream (as before tenants) nor arq, saq or
taskiq: a stream, like those libraries' queues, delivers in arrival order, and fair share means
choosing *which* waiting task starts next, by tenant and priority, and passing over a tenant that
holds as many tasks as its ``running_tasks`` limit allows, however many workers on however many
machines hold them. Each change below is one script, so it is atomic across every process.

Keys (``dsocr:`` first)::

    line:<tenant>    sorted set: a tenant's waiting ids -> band * 2^50 + arrival number
                     (interactive before batch, each in arrival order); <tenant> "-" for no tenant
    seq              the arrival counter
    ring             list: the tenants with waiting tasks, the one taking its turn first
    turn             hash {tenant, used}: whose turn it is and the starts it has made in it
    queued           sorted set: ids waiting -> when they were queued (depth, oldest age)
    task-tenant      hash: id -> its tenant, while it waits or is held
    held             sorted set: ids handed to a worker -> when its hold lapses (ms)
    holder           hash: id -> the consumer (process) holding it
    held:<tenant>    set: the tenant's held ids (its running limit)
    reservations     sorted set: submits storing their task -> when their slot lapses
    doorbell         list: rung on every enqueue and every end, so waiting workers look again
    count:waiting    list of "1"s as long as ``queued``, and
    count:held       list of "1"s as long as ``held``: lengths an autoscaler can read (KEDA's
                     ``redis`` list scaler, as the Helm chart does), kept in step by the scripts

Delivery is at least once, as with the stream's pending list: a task stays ``held`` until its
holder acknowledges it; a holder renews its hold (``touch``) while it works; a task whose hold
lapsed (a SIGKILLed worker, a lost machine) is the first thing the next ``get`` on any process
takes over, before any new task, and it still counts toward its tenant's running limit meanwhile.
Persistence is Redis's (the append-only file).

The bound counts ``queued`` plus live reservations, checked and taken in one script, so it holds
across every API replica. A reservation a crashed replica never committed lapses after
``RESERVATION_SECONDS``. Tasks left in the stream of earlier versions (``dsocr:queue``) are moved
into the lines by ``setup``, as tasks without a tenant.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import redis.asyncio

from app.errors import QueueFull
from app.metrics import Metrics
from app.records import Priority
from app.storage.redis_conn import translated
from app.tasks.queue import BANDS, EqualShares, Shares, line_of, tenant_of

log = logging.getLogger(__name__)

PREFIX = "dsocr:"
QUEUED = f"{PREFIX}queued"
RESERVATIONS = f"{PREFIX}reservations"
DOORBELL = f"{PREFIX}doorbell"
WAITING_COUNT = f"{PREFIX}count:waiting"  # for autoscalers (the Helm chart's KEDA triggers)
HELD_COUNT = f"{PREFIX}count:held"
OLD_STREAM = f"{PREFIX}queue"  # the queue of versions before fair share
RESERVATION_SECONDS = 120  # longer than storing any upload takes
READ_BLOCK_MS = 2000  # a get() wakes at least this often to look for tasks to redeliver

# Every script names its keys from ``P`` (the prefix) and the tenant: one Redis, not a cluster.
_HEAD = "local P = 'dsocr:'\n"

# KEYS: queued, reservations. ARGV: now, bound, token, lapse time. 1: taken; 0: full.
_RESERVE = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
return 1
"""

# Puts a task in its tenant's line (its holder, if any, holds it no longer). ARGV: id, tenant,
# band, now (s), reservation token or "". 1: queued; 0: it was waiting already.
_ENQUEUE = (
    _HEAD
    + """
local task, tenant, band, now, token = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
if token ~= '' then redis.call('ZREM', P..'reservations', token) end
local was = redis.call('HGET', P..'task-tenant', task)
if redis.call('ZREM', P..'held', task) == 1 then
  redis.call('HDEL', P..'holder', task)
  redis.call('LPOP', P..'count:held')
  if was then redis.call('SREM', P..'held:'..was, task) end
end
if was and redis.call('ZSCORE', P..'line:'..was, task) then return 0 end
local line = P..'line:'..tenant
if redis.call('EXISTS', line) == 0 then redis.call('RPUSH', P..'ring', tenant) end
local seq = redis.call('INCR', P..'seq')
redis.call('ZADD', line, string.format('%.0f', band * 1125899906842624 + seq), task)
redis.call('ZADD', P..'queued', 'NX', now, task)
redis.call('RPUSH', P..'count:waiting', '1')
redis.call('HSET', P..'task-tenant', task, tenant)
redis.call('LPUSH', P..'doorbell', '1')
redis.call('LTRIM', P..'doorbell', 0, 63)
return 1
"""
)

# The next task for consumer ARGV[3]: one whose hold lapsed, else the fair-share rule of
# app.tasks.queue (MemoryQueue._take is the same). ARGV: now (ms), new hold's lapse (ms), consumer,
# then (tenant, weight, running limit or 0) for every tenant not weight 1 without limit.
# Returns {id, 1 if redelivered else 0}, or nil.
_TAKE = (
    _HEAD
    + """
local now, lapse, me = ARGV[1], ARGV[2], ARGV[3]
local lapsed = redis.call('ZRANGEBYSCORE', P..'held', '-inf', now, 'LIMIT', 0, 1)
if #lapsed > 0 then
  redis.call('ZADD', P..'held', lapse, lapsed[1])
  redis.call('HSET', P..'holder', lapsed[1], me)
  return {lapsed[1], 1}
end
local weight, limit = {}, {}
for i = 4, #ARGV, 3 do
  weight[ARGV[i]] = tonumber(ARGV[i + 1])
  limit[ARGV[i]] = tonumber(ARGV[i + 2])
end
local ring = P..'ring'
local n = redis.call('LLEN', ring)
local turn = redis.call('HMGET', P..'turn', 'tenant', 'used')
local turn_tenant, used = turn[1], tonumber(turn[2] or '0')
local blocked = 0
for _ = 0, n do
  if blocked >= n then break end
  local tenant = redis.call('LINDEX', ring, 0)
  if tenant ~= turn_tenant then turn_tenant, used = tenant, 0 end
  local cap = limit[tenant] or 0
  local at_limit = cap > 0 and redis.call('SCARD', P..'held:'..tenant) >= cap
  if not at_limit and used < (weight[tenant] or 1) then
    local line = P..'line:'..tenant
    local task = redis.call('ZRANGE', line, 0, 0)[1]
    redis.call('ZREM', line, task)
    if redis.call('EXISTS', line) == 0 then redis.call('LPOP', ring) end
    redis.call('ZREM', P..'queued', task)
    redis.call('LPOP', P..'count:waiting')
    redis.call('RPUSH', P..'count:held', '1')
    redis.call('ZADD', P..'held', lapse, task)
    redis.call('HSET', P..'holder', task, me)
    redis.call('SADD', P..'held:'..tenant, task)
    redis.call('HSET', P..'turn', 'tenant', tenant, 'used', used + 1)
    return {task, 0}
  end
  if at_limit then blocked = blocked + 1 end
  redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
  turn_tenant, used = false, 0
end
redis.call('HSET', P..'turn', 'tenant', turn_tenant or '', 'used', used)
return nil
"""
)

# ARGV: id, consumer, new lapse (ms). 1: renewed; 0: another consumer holds it (or nobody).
_TOUCH = (
    _HEAD
    + """
if redis.call('HGET', P..'holder', ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', P..'held', 'XX', ARGV[3], ARGV[1])
return 1
"""
)

# ARGV: id, consumer. Ends the consumer's hold; 0 when it holds the task no longer.
_ACK = (
    _HEAD
    + """
local task = ARGV[1]
if redis.call('HGET', P..'holder', task) ~= ARGV[2] then return 0 end
redis.call('ZREM', P..'held', task)
redis.call('HDEL', P..'holder', task)
redis.call('LPOP', P..'count:held')
local tenant = redis.call('HGET', P..'task-tenant', task)
if tenant then
  redis.call('SREM', P..'held:'..tenant, task)
  if not redis.call('ZSCORE', P..'line:'..tenant, task) then redis.call('HDEL', P..'task-tenant', task) end
end
redis.call('LPUSH', P..'doorbell', '1')
redis.call('LTRIM', P..'doorbell', 0, 63)
return 1
"""
)

# ARGV: id. Takes a waiting task out of its line; 0 when it was not waiting.
_DISCARD = (
    _HEAD
    + """
local task = ARGV[1]
local tenant = redis.call('HGET', P..'task-tenant', task)
if not tenant then return 0 end
local line = P..'line:'..tenant
if redis.call('ZREM', line, task) == 0 then return 0 end
redis.call('ZREM', P..'queued', task)
redis.call('LPOP', P..'count:waiting')
if not redis.call('ZSCORE', P..'held', task) then redis.call('HDEL', P..'task-tenant', task) end
if redis.call('EXISTS', line) == 0 then redis.call('LREM', P..'ring', 0, tenant) end
return 1
"""
)

# ARGV: id. What estimate_position needs, read at one instant: {rank (0-based), tenant, turn tenant,
# turn starts, then each ring tenant and its line's length, from the head}; nil when not waiting.
_POSITION = (
    _HEAD
    + """
local tenant = redis.call('HGET', P..'task-tenant', ARGV[1])
if not tenant then return nil end
local rank = redis.call('ZRANK', P..'line:'..tenant, ARGV[1])
if not rank then return nil end
local turn = redis.call('HMGET', P..'turn', 'tenant', 'used')
local reply = {rank, tenant, turn[1] or '', turn[2] or '0'}
for _, name in ipairs(redis.call('LRANGE', P..'ring', 0, -1)) do
  table.insert(reply, name)
  table.insert(reply, redis.call('ZCARD', P..'line:'..name))
end
return reply
"""
)

# Moves the ids of an earlier version's stream into the line of tasks without a tenant (unless
# they are waiting or held already), in stream order, and deletes the stream. ARGV: now (s).
_MIGRATE = (
    _HEAD
    + """
local entries = redis.call('XRANGE', P..'queue', '-', '+')
local moved = 0
for _, entry in ipairs(entries) do
  local fields, task = entry[2], nil
  for i = 1, #fields, 2 do if fields[i] == 'task' then task = fields[i + 1] end end
  if task and not redis.call('HGET', P..'task-tenant', task) then
    local line = P..'line:-'
    if redis.call('EXISTS', line) == 0 then redis.call('RPUSH', P..'ring', '-') end
    redis.call('ZADD', line, redis.call('INCR', P..'seq'), task)
    redis.call('ZADD', P..'queued', 'NX', ARGV[1], task)
    redis.call('RPUSH', P..'count:waiting', '1')
    redis.call('HSET', P..'task-tenant', task, '-')
    moved = moved + 1
  end
end
redis.call('DEL', P..'queue')
return moved
"""
)


def estimate_position(
    ring: Sequence[str],
    turn: tuple[str | None, int],
    waiting: Mapping[str, int],
    weight: Callable[[str], int],
    line: str,
    rank: int,
) -> int:
    """Where the ``rank``-th task (1-based) of ``line`` would start (1: next) if nothing else
    arrived and no tenant were held at its running limit: every start of the rounds before the
    one that reaches it, plus, in that round, the starts of the tenants ahead of it in the ring.

    ``ring`` is the ring from its head, ``turn`` the tenant whose turn is under way and the starts
    it has made, ``waiting`` each line's length.
    """
    order = list(ring)
    first_round = {name: weight(name) for name in order}  # starts each gets in the current round
    if order and turn[0] == order[0]:
        left = first_round[order[0]] - turn[1]
        if left > 0:
            first_round[order[0]] = left
        else:  # its turn is over: it goes to the end of the ring at the next start
            order = order[1:] + order[:1]
    # The round (1: the current one) in which this task starts.
    own = first_round[line]
    rounds = 1 if rank <= own else 1 + math.ceil((rank - own) / weight(line))
    before = 0
    mine = order.index(line)
    for index, other in enumerate(order):
        if other == line:
            continue
        full_rounds = rounds if index < mine else rounds - 1
        if full_rounds > 0:
            before += min(waiting[other], first_round[other] + (full_rounds - 1) * weight(other))
    return before + rank


class _RedisReservation:
    def __init__(self, queue: RedisQueue, token: str) -> None:
        self._queue = queue
        self._token = token
        self._open = True

    async def commit(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        if self._open:
            self._open = False
            await self._queue._enqueue(task_id, tenant, priority, reservation=self._token)

    async def release(self) -> None:
        if self._open:
            self._open = False
            with translated("releasing a queue slot"):
                await self._queue._redis.zrem(RESERVATIONS, self._token)


class RedisQueue:
    """``TaskQueue`` in Redis; one instance per process, named as a consumer."""

    durable = True

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        maxsize: int,
        visibility_seconds: float,
        metrics: Metrics,
        shares: Shares | None = None,
    ) -> None:
        self.maxsize = maxsize
        self._redis = client
        self._visibility_ms = max(int(visibility_seconds * 1000), 1)
        self._metrics = metrics
        self._shares = shares or EqualShares()
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._reserve = client.register_script(_RESERVE)
        self._enqueue_script = client.register_script(_ENQUEUE)
        self._take = client.register_script(_TAKE)
        self._touch = client.register_script(_TOUCH)
        self._ack = client.register_script(_ACK)
        self._discard = client.register_script(_DISCARD)
        self._position = client.register_script(_POSITION)
        self._migrate = client.register_script(_MIGRATE)

    async def setup(self) -> None:
        """Move tasks an earlier version left in its stream into the lines (every process may;
        the first moves them, the stream is gone for the rest)."""
        with translated("setting up the queue"):
            moved = int(await self._migrate(args=[time.time()]))
        if moved:
            log.info("moved %d tasks from the queue of an earlier version", moved)

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

    async def requeue(self, task_id: str, *, tenant: str | None, priority: Priority) -> None:
        await self._enqueue(task_id, tenant, priority, reservation=None)

    async def _enqueue(
        self, task_id: str, tenant: str | None, priority: Priority, *, reservation: str | None
    ) -> None:
        args: list[str | int | float] = [
            task_id,
            line_of(tenant),
            BANDS[priority],
            time.time(),
            reservation or "",
        ]
        with translated(f"queueing task {task_id}"):
            await self._enqueue_script(args=args)

    async def get(self) -> str:
        """The next task: first one whose worker went silent past the visibility timeout, else the
        next by fair share, waiting as long as it takes (woken by the doorbell, or every
        ``READ_BLOCK_MS`` to look for lapsed holds)."""
        while True:
            with translated("waiting for a task"):
                taken = await self._take(args=self._take_args())
                if taken is None:
                    await self._redis.execute_command("BLPOP", DOORBELL, READ_BLOCK_MS / 1000)
                    continue
            task_id, redelivered = taken[0].decode(), int(taken[1])
            if redelivered:
                self._metrics.redeliveries.inc()
                seconds = self._visibility_ms / 1000
                log.warning("task %s: its worker went silent for %.0f s; delivered again", task_id, seconds)
            return task_id

    def _take_args(self) -> list[str | int]:
        now = int(time.time() * 1000)
        args: list[str | int] = [now, now + self._visibility_ms, self.consumer]
        # Only tenants that differ from the default (weight 1, no limit): the script's fallback.
        for name in self._shares.names():
            weight, limit = self._shares.weight(name), self._shares.running_limit(name)
            if weight != 1 or limit is not None:
                args += [name, weight, limit or 0]
        return args

    async def touch(self, task_id: str) -> bool:
        lapse = int(time.time() * 1000) + self._visibility_ms
        with translated(f"renewing the lease on task {task_id}"):
            return bool(await self._touch(args=[task_id, self.consumer, lapse]))

    async def ack(self, task_id: str) -> None:
        with translated(f"acknowledging task {task_id}"):
            await self._ack(args=[task_id, self.consumer])

    def forget(self, task_id: str) -> None:
        """Nothing to do here: the hold stays in Redis until it lapses, and the task is then
        delivered again (another worker may hold it already)."""

    async def discard(self, task_id: str) -> None:
        # A task held by a worker stays there: the worker finds it canceled and skips it.
        with translated(f"discarding task {task_id}"):
            await self._discard(args=[task_id])

    async def position(self, task_id: str) -> int | None:
        with translated("reading the queue"):
            reply = await self._position(args=[task_id])
        if reply is None:
            return None
        rank, line, turn_line, used = int(reply[0]), reply[1].decode(), reply[2].decode(), int(reply[3])
        names = [name.decode() for name in reply[4::2]]
        waiting = {name: int(count) for name, count in zip(names, reply[5::2], strict=True)}
        return estimate_position(
            names,
            (turn_line or None, used),
            waiting,
            lambda name: self._shares.weight(tenant_of(name)),
            line,
            rank + 1,
        )

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
