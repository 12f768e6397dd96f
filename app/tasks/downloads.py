"""Every way out of a task's results: single files (streamed, or a presigned URL the client fetches
itself), page previews, the streamed zip, a page of ``result.json`` for the console, and share links.

Each method with a caller takes the record the caller may see, read once by the router
(``app.api.results.VisibleTask``); nothing here reads it again, and the store reads files by it
(``TaskStore.open_result``). A share link has no caller: its signature grants one file of one task
and nothing else (the task id and file name are in the signed message), the file must be one the
task offers, and the task must have succeeded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from app.errors import InvalidOptions, ResultNotFound, StorageError
from app.records import TaskRecord
from app.render.page import StoredPage
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
    """Reading a task's results for its caller, and issuing and honouring share links.

    Blocking store reads run in threads; what is returned open (a stream, the zip's iterator) is
    read by the caller, in a thread as well (Starlette does so for a plain iterator).
    """

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

    async def file(self, record: TaskRecord, name: str, *, redirect: bool = True) -> BinaryIO | str:
        """A result file (``full.md``, ``layout.json``, ``result.json``, ``images/<name>``) of a
        succeeded task: the URL the client may fetch it from itself (a presigned bucket URL, when the
        store hands them out and ``redirect``), else an open stream of it, which the caller closes.

        Raises ``TaskNotFinished`` before the task succeeded, ``ResultNotFound`` for a file it lacks.
        """
        record.require_succeeded()
        if redirect:
            url = await asyncio.to_thread(self._store.result_url, record, name)
            if url is not None:
                return url
        return await asyncio.to_thread(self._store.open_result, record, name)

    async def preview(self, record: TaskRecord, number: int) -> BinaryIO:
        """An open stream of the preview of page ``number``, from the moment it is rendered, whatever
        the task's status; ``ResultNotFound`` before that or for a page the task does not have."""
        if number not in record.page_numbers:
            raise ResultNotFound(
                f"task {record.task_id} has no page {number}; its pages are {record.page_numbers}"
            )
        return await asyncio.to_thread(self._store.open_preview, record, number)

    def archive(self, record: TaskRecord) -> Iterator[bytes]:
        """The zip of a succeeded task's results, produced as it is iterated (blocking reads).

        Raises ``TaskNotFinished`` at once; a file that vanishes meanwhile raises ``ResultNotFound``
        from the iteration.
        """
        record.require_succeeded()
        return archive_chunks(self._store, record)

    async def stored_page(self, record: TaskRecord, number: int) -> StoredPage:
        """Page ``number`` (the document's page number) as ``result.json`` holds it.

        Raises ``TaskNotFinished`` before the task succeeded, ``ResultNotFound`` when the result has
        no such page, and ``StorageError`` when ``result.json`` cannot be read as the worker writes it.
        """
        record.require_succeeded()
        return await asyncio.to_thread(self._read_page, record, number)

    def _read_page(self, record: TaskRecord, number: int) -> StoredPage:
        with self._store.open_result(record, "result.json") as handle:
            try:
                pages = json.load(handle)["pages"]
                entry = next((p for p in pages if p["page"] == number), None)
                stored = None if entry is None else StoredPage.model_validate(entry)
            # Bad JSON or an unexpected shape; pydantic's ValidationError is a ValueError.
            except (ValueError, KeyError, TypeError) as exc:
                raise StorageError(f"result.json of task {record.task_id} is not readable: {exc}") from exc
        if stored is None:
            raise ResultNotFound(f"task {record.task_id} has no page {number} in its result")
        return stored

    def issue_link(self, record: TaskRecord, file: str, expires_in: int | None) -> IssuedLink:
        """Sign a link to one result file of a succeeded task, valid for ``expires_in`` seconds.

        Raises ``InvalidOptions`` for a lifetime above ``APP_LINK_MAX_EXPIRE_SECONDS``, then
        ``TaskNotFinished``, and ``ResultNotFound`` for a file the task does not offer.
        """
        seconds = self.default_expire_seconds if expires_in is None else expires_in
        if seconds > self.max_expire_seconds:
            raise InvalidOptions(
                f"expires_in {seconds} s is above the limit of {self.max_expire_seconds} s "
                "(APP_LINK_MAX_EXPIRE_SECONDS)"
            )
        record.require_succeeded()
        _check_offered(record, file)
        expires = int(time.time()) + seconds
        return IssuedLink(
            file=file,
            url=self._base_url + self._signer.path(record.task_id, file, expires),
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
        record = await asyncio.to_thread(self._store.load, task_id)
        record.require_succeeded()
        offered = _check_offered(record, file)
        return await asyncio.to_thread(open_result, self._store, record, offered.name), offered.content_type


def _check_offered(record: TaskRecord, file: str) -> ResultFile:
    """The stored file ``file`` names (as stored, or by its route's name: ``result.md``)."""
    stored = ROUTE_NAMES.get(file, file)
    for offered in result_files(record):
        if offered.name == stored:
            return offered
    raise ResultNotFound(f"task {record.task_id} has no result named {file!r}")
