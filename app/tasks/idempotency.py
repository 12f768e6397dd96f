"""Idempotency keys: a retried create returns the task the first try created instead of a second one.

A key belongs to its owner (the API key's hash; one shared scope with auth off) and is remembered
for ``KEY_TTL`` with a fingerprint of what was asked: the uploaded bytes and the options, or the
URL and the options. The same key with the same fingerprint finds the first task; with another
fingerprint it is refused (``IdempotencyKeyReused``): answering with a task made from another
document would be wrong, and making a second task would break the key's promise.

Entries live in the store (files in the data directory; Redis keys in the scale-out mode), named by
a hash of owner and key, so they survive restarts and never hold the key itself. Requests with one
key are serialised in this process and, through the store's ``key_lock``, across API replicas, so
two concurrent retries cannot both create a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.errors import IdempotencyKeyReused
from app.records import TaskOptions
from app.storage.base import TaskStore

KEY_TTL = timedelta(hours=24)


def fingerprint(options: TaskOptions, *, url: str | None = None, upload: Path | None = None) -> str:
    """SHA-256 over the options, the URL and the uploaded bytes (blocking: reads ``upload``)."""
    digest = hashlib.sha256()
    request = {"url": url, "options": options.model_dump(mode="json")}
    digest.update(json.dumps(request, sort_keys=True, separators=(",", ":")).encode())
    if upload is not None:
        with upload.open("rb") as fh:
            digest.update(b"\0")
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


class IdempotencyKeys:
    """Remembers which task each (owner, key) created, and with which fingerprint."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}  # holders and waiters per lock, to drop unused locks

    @staticmethod
    def _name(owner: str | None, key: str) -> str:
        return hashlib.sha256(f"{owner or ''}\n{key}".encode()).hexdigest()

    @contextlib.asynccontextmanager
    async def serialised(self, owner: str | None, key: str) -> AsyncIterator[None]:
        """Hold the key for a find-create-remember sequence; other requests with it wait."""
        name = self._name(owner, key)
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._waiting[name] = self._waiting.get(name, 0) + 1
        try:
            async with lock:
                held = self._store.key_lock(name)  # and against other API replicas
                await asyncio.to_thread(held.__enter__)
                try:
                    yield
                finally:
                    await asyncio.to_thread(held.__exit__, None, None, None)
        finally:
            self._waiting[name] -= 1
            if not self._waiting[name]:
                del self._waiting[name], self._locks[name]

    async def find(self, owner: str | None, key: str, fingerprint: str) -> str | None:
        """The id of the task created with this key in the last 24 h, or ``None``.

        Raises ``IdempotencyKeyReused`` when that task was created from another request.
        """
        entry = await asyncio.to_thread(self._store.read_key, self._name(owner, key))
        if entry is None or _expired(entry):
            return None
        if entry.get("fingerprint") != fingerprint:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used for a different request (another document or other "
                "options) in the last 24 hours; use a new key for a new request"
            )
        task_id = entry.get("task_id")
        return task_id if isinstance(task_id, str) else None

    async def remember(self, owner: str | None, key: str, fingerprint: str, task_id: str) -> None:
        entry = {"task_id": task_id, "fingerprint": fingerprint, "created_at": datetime.now(UTC).isoformat()}
        await asyncio.to_thread(self._store.write_key, self._name(owner, key), entry)

    def expire(self) -> int:
        """Delete entries older than ``KEY_TTL`` (blocking); returns how many."""
        expired = 0
        for name in self._store.key_names():
            entry = self._store.read_key(name)
            if entry is None or _expired(entry):
                self._store.delete_key(name)
                expired += 1
        return expired


def _expired(entry: dict[str, Any]) -> bool:
    try:
        created = datetime.fromisoformat(entry["created_at"])
    except (KeyError, TypeError, ValueError):
        return True  # not an entry this service wrote: treat the key as unused
    return datetime.now(UTC) - created > KEY_TTL
