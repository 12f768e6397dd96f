"""Downloads beyond the single-file routes: the streamed zip, and share links that need no API key.

A share link grants one file of one task and nothing else: the task id and file name are in the
signed message, the file name must be one the task offers, and the task must have succeeded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from app.errors import InvalidOptions, ResultNotFound, TaskNotFinished
from app.records import TaskRecord, TaskStatus
from app.result_files import ROUTE_NAMES
from app.storage.archive import ResultFile, archive_chunks, open_result, result_files
from app.storage.base import TaskStore
from app.storage.links import LinkSigner


@dataclass(frozen=True)
class IssuedLink:
    file: str
    url: str  # absolute with APP_LINK_BASE_URL, else relative to the service root
    expires_at: datetime


class Downloads:
    """The zip of a task's results, and issuing and honouring share links."""

    def __init__(
        self,
        *,
        store: TaskStore,
        signer: LinkSigner,
        base_url: str | None,
        default_expire_seconds: int,
        max_expire_seconds: int,
    ) -> None:
        self._store = store
        self._signer = signer
        self._base_url = (base_url or "").rstrip("/")
        self.default_expire_seconds = default_expire_seconds
        self.max_expire_seconds = max_expire_seconds

    async def _succeeded(self, task_id: str) -> TaskRecord:
        record = await asyncio.to_thread(self._store.load, task_id)
        if record.status is not TaskStatus.SUCCEEDED:
            raise TaskNotFinished(f"task {task_id} is {record.status.value}; results exist once it succeeded")
        return record

    async def archive(self, task_id: str) -> Iterator[bytes]:
        """The zip of a succeeded task's results, produced as it is iterated (blocking reads)."""
        return archive_chunks(self._store, await self._succeeded(task_id))

    async def issue_link(self, task_id: str, file: str, expires_in: int | None) -> IssuedLink:
        """Sign a link to one result file of a succeeded task, valid for ``expires_in`` seconds.

        Raises ``TaskNotFinished``, ``ResultNotFound`` for a file the task does not offer, and
        ``InvalidOptions`` for a lifetime above ``APP_LINK_MAX_EXPIRE_SECONDS``.
        """
        seconds = self.default_expire_seconds if expires_in is None else expires_in
        if seconds > self.max_expire_seconds:
            raise InvalidOptions(
                f"expires_in {seconds} s is above the limit of {self.max_expire_seconds} s "
                "(APP_LINK_MAX_EXPIRE_SECONDS)"
            )
        record = await self._succeeded(task_id)
        _check_offered(record, file)
        expires = int(time.time()) + seconds
        return IssuedLink(
            file=file,
            url=self._base_url + self._signer.path(task_id, file, expires),
            expires_at=datetime.fromtimestamp(expires, UTC),
        )

    async def open_shared(
        self, task_id: str, file: str, expires: str | None, signature: str | None
    ) -> tuple[BinaryIO, str]:
        """Open the file a share link grants, with its content type; the caller closes it.

        Raises ``LinkInvalid`` or ``LinkExpired`` before the task is even looked up, then
        ``TaskNotFound``, ``TaskNotFinished`` or ``ResultNotFound``.
        """
        self._signer.verify(task_id, file, expires, signature)
        record = await self._succeeded(task_id)
        offered = _check_offered(record, file)
        return await asyncio.to_thread(open_result, self._store, record, offered.name), offered.content_type


def _check_offered(record: TaskRecord, file: str) -> ResultFile:
    """The stored file ``file`` names (as stored, or by its route's name: ``result.md``)."""
    stored = ROUTE_NAMES.get(file, file)
    for offered in result_files(record):
        if offered.name == stored:
            return offered
    raise ResultNotFound(f"task {record.task_id} has no result named {file!r}")
