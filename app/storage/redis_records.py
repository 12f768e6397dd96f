"""Task records, their summaries and idempotency entries in Redis, for API replicas and workers.

Keys (``dsocr:`` first)::

    task:<id>       hash: record (the TaskRecord as JSON), lease (its fencing token), revision,
                    cancel ("1")
    summaries       hash: <id> -> what listing and expiry need (created, status, owner, finished)
    idem:<name>     an idempotency entry, expiring on its own after 24 h

A ``save`` is one Lua script: it compares the stored lease with the one the writer expects, and the
stored revision with the one the writer read, and writes the record and its summary only when both
match (``LeaseLost``, ``RecordChanged`` otherwise): no writer can overwrite a record another worker
has taken since it read it, and two processes updating one finished task (a publish asked of an API
replica while the worker delivers its webhook) cannot lose each other's change. ``cancel`` is a
field of its own: an API replica sets it while the worker running the task keeps saving the
record, and ``load`` folds it into ``cancel_requested``.

Blocking (redis-py's synchronous client); callers on the event loop use threads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any, cast

import redis

from app.errors import LeaseLost, RecordChanged, ServiceUnavailable, TaskNotFound
from app.records import TASK_ID_PATTERN, TaskRecord, TaskStatus
from app.storage.base import RecordSummary, summary_of
from app.storage.redis_conn import translated

PREFIX = "dsocr:"
SUMMARIES = f"{PREFIX}summaries"
KEY_LOCK_SECONDS = 120  # longer than storing any upload takes

# KEYS: task hash, summaries. ARGV: expected lease ("" when creating), record JSON, new lease,
# task id, summary JSON, expected revision, new revision. Returns 1 (written), 0 (the stored lease
# differs), -2 (same lease, but the record was written since it was read), -1 (no such task).
_SAVE = """
local stored = redis.call('HMGET', KEYS[1], 'lease', 'revision')
if ARGV[1] == '' then
  if stored[1] then return 0 end
elseif not stored[1] then
  return -1
elseif stored[1] ~= ARGV[1] then
  return 0
elseif (stored[2] or '0') ~= ARGV[6] then
  return -2
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'lease', ARGV[3], 'revision', ARGV[7])
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
return 1
"""


def _task_key(task_id: str) -> str:
    if not TASK_ID_PATTERN.match(task_id):
        raise TaskNotFound(f"no task {task_id!r}")
    return f"{PREFIX}task:{task_id}"


def _summary_json(record: TaskRecord) -> str:
    summary = summary_of(record)
    return json.dumps(
        {
            "created": summary.created_at.isoformat(),
            "status": summary.status.value,
            "owner": summary.owner,
            "finished": summary.finished_at.isoformat() if summary.finished_at else None,
        }
    )


def _parse_summary(task_id: str, raw: bytes) -> RecordSummary:
    data = json.loads(raw)
    finished = data.get("finished")
    return RecordSummary(
        task_id=task_id,
        created_at=datetime.fromisoformat(data["created"]),
        status=TaskStatus(data["status"]),
        owner=data.get("owner"),
        finished_at=datetime.fromisoformat(finished) if finished else None,
    )


class RedisRecords:
    """The record half of the shared store (``app.storage.shared``)."""

    def __init__(self, client: redis.Redis, *, idempotency_ttl: timedelta) -> None:
        """``idempotency_ttl``: how long an idempotency key's entry counts (the job system's rule)."""
        self._redis = client
        self._idempotency_ttl = idempotency_ttl
        self._save = client.register_script(_SAVE)

    def ping(self) -> bool:
        try:
            return bool(self._redis.ping())
        except redis.RedisError:
            return False

    def create(self, record: TaskRecord) -> None:
        self._write(record, expect="")

    def save(self, record: TaskRecord, *, expect_lease: int | None = None) -> None:
        self._write(record, expect=str(record.lease if expect_lease is None else expect_lease))

    def _write(self, record: TaskRecord, *, expect: str) -> None:
        """Write ``record`` if the stored lease is ``expect`` and nobody wrote it since it was read
        (its ``revision``); the record's revision moves on only when the write happened."""
        read_at = record.revision
        record.revision += 1
        try:
            with translated(f"saving task {record.task_id}"):
                written = self._save(
                    keys=[_task_key(record.task_id), SUMMARIES],
                    args=[
                        expect,
                        record.model_dump_json(),
                        record.lease,
                        record.task_id,
                        _summary_json(record),
                        read_at,
                        record.revision,
                    ],
                )
        except BaseException:
            record.revision = read_at
            raise
        if written == 1:
            return
        record.revision = read_at
        if written == -1:
            raise TaskNotFound(f"no task {record.task_id!r} (it expired or was deleted)")
        if written == -2:
            raise RecordChanged(f"task {record.task_id} was written by another process since it was read")
        raise LeaseLost(
            f"task {record.task_id} was taken by another worker (lease {expect or 'none'} is stale)"
        )

    def load(self, task_id: str) -> TaskRecord:
        with translated(f"reading task {task_id}"):
            raw, cancel = cast(list[Any], self._redis.hmget(_task_key(task_id), ["record", "cancel"]))
        if raw is None:
            raise TaskNotFound(f"no task {task_id!r}")
        record = TaskRecord.model_validate_json(raw)
        record.cancel_requested = record.cancel_requested or cancel == b"1"
        return record

    def request_cancel(self, task_id: str) -> None:
        with translated(f"canceling task {task_id}"):
            if self._redis.exists(_task_key(task_id)):
                self._redis.hset(_task_key(task_id), "cancel", "1")

    def delete(self, task_id: str) -> None:
        with translated(f"deleting task {task_id}"):
            pipe = self._redis.pipeline()
            pipe.delete(_task_key(task_id))
            pipe.hdel(SUMMARIES, task_id)
            pipe.execute()

    def summaries(self) -> list[RecordSummary]:
        with translated("listing tasks"):
            entries = cast(dict[bytes, bytes], self._redis.hgetall(SUMMARIES))
        return [_parse_summary(task_id.decode(), raw) for task_id, raw in entries.items()]

    def list_records(self) -> Iterator[TaskRecord]:
        for summary in self.summaries():
            try:
                yield self.load(summary.task_id)
            except TaskNotFound:
                continue  # deleted since it was listed

    # --- idempotency entries ---

    def read_key(self, name: str) -> dict[str, Any] | None:
        with translated("reading an idempotency key"):
            raw = cast(bytes | None, self._redis.get(f"{PREFIX}idem:{name}"))
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def write_key(self, name: str, entry: dict[str, Any]) -> None:
        # Expires on its own a little after the entry itself says it has (app.tasks.idempotency).
        ttl = self._idempotency_ttl + timedelta(minutes=5)
        with translated("writing an idempotency key"):
            self._redis.set(f"{PREFIX}idem:{name}", json.dumps(entry), ex=ttl)

    @contextlib.contextmanager
    def key_lock(self, name: str) -> Iterator[None]:
        """A Redis lock on entry ``name``, so that two replicas given the same key at once make one
        task; it lapses after ``KEY_LOCK_SECONDS`` if its holder dies."""
        lock = self._redis.lock(
            f"{PREFIX}idem-lock:{name}", timeout=KEY_LOCK_SECONDS, blocking_timeout=KEY_LOCK_SECONDS
        )
        with translated("locking an idempotency key"):
            if not lock.acquire():
                raise ServiceUnavailable("another request with this Idempotency-Key is still being created")
        try:
            yield
        finally:
            with contextlib.suppress(redis.RedisError):  # lapsed already: nothing to release
                lock.release()

    def delete_key(self, name: str) -> None:
        with translated("deleting an idempotency key"):
            self._redis.delete(f"{PREFIX}idem:{name}")
