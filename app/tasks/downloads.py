"""Every way out of a task's results: single files (streamed, or a presigned URL the client fetches
itself), the exports (chunks.json, result.html, result.docx), page previews, the streamed zip, a
page of ``result.json`` for the console, and share links.

Each method with a caller takes the record the caller may see, read once by the router
(``app.api.results.VisibleTask``); nothing here reads it again, and the store reads files by it
(``TaskStore.open_result``). A share link has no caller: its signature grants one file of one task
and nothing else (the task id and file name are in the signed message), the file must be one the
task offers, and the task must have succeeded.

The exports are built from ``result.json`` and the crops each time they are asked for, not stored
when the task ends. Measured on the export tests' two-page report repeated to 200 pages (two
shared CPU cores): chunks.json 0.1 ms a page and result.html 0.9 ms a page, both streamed as they
are built; result.docx 13 ms a page (2.7 s for 200 pages), paid only by those who ask for one.
Built at the end, they would cost every task that time and its storage, wanted or not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

from app.errors import InvalidOptions, ResultNotFound, StorageError
from app.formats import check_limits, load_counter, stream_chunks_json, stream_html, write_docx
from app.formats.chunks import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP
from app.records import TaskRecord
from app.render.page import StoredPage
from app.result_files import ROUTE_NAMES
from app.storage.archive import CHUNK, ResultFile, archive_chunks, open_result, result_files
from app.storage.base import TaskStore
from app.storage.links import LinkSigner


@dataclass(frozen=True)
class IssuedLink:
    file: str
    url: str  # absolute with APP_LINK_BASE_URL, else relative to the service root
    expires_at: datetime


_DOCX_BUILDS_AT_ONCE = 2  # per process; more requests wait their turn


class Exports:
    """Builds a succeeded task's exports from its stored ``result.json`` and crops, read by the
    record (``app.storage.archive.ExportBuilder``): for the zip, publishing and share links, with
    the defaults (chunks of ``DEFAULT_MAX_TOKENS`` character-estimated tokens, no overlap, figure
    links relative to the result's folder, ``images/<name>``). Every method blocks: run it in a thread.
    """

    def __init__(self, store: TaskStore) -> None:
        self._store = store

    def build(self, record: TaskRecord, name: str) -> Iterator[bytes]:
        """Export ``name`` with the defaults, produced as it is iterated; nothing is read before."""
        result = self.read_result(record)
        if name == "chunks.json":
            yield from stream_chunks_json(result, load_counter(None))
        elif name == "result.html":
            yield from stream_html(result, self.crops(record))
        elif name == "result.docx":
            with self.docx_file(record, result) as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
        else:
            raise ResultNotFound(f"task {record.task_id} has no export named {name!r}")

    def read_result(self, record: TaskRecord) -> dict[str, Any]:
        """``result.json`` parsed; ``StorageError`` when it is not the JSON object the worker writes."""
        with self._store.open_result(record, "result.json") as handle:
            try:
                result = json.load(handle)
            except ValueError as exc:
                raise StorageError(f"result.json of task {record.task_id} is not readable: {exc}") from exc
        if not isinstance(result, dict):
            raise StorageError(f"result.json of task {record.task_id} is not a JSON object")
        return result

    def crops(self, record: TaskRecord) -> Callable[[str], bytes | None]:
        """The task's crops by name (an ``ImageSource``): None for a name the task has no crop of; a
        crop it lists but the store lost (the task expired meanwhile) raises ``ResultNotFound``."""

        def read(name: str) -> bytes | None:
            if name not in record.images:
                return None
            with self._store.open_result(record, f"images/{name}") as handle:
                return handle.read()

        return read

    def docx_file(self, record: TaskRecord, result: dict[str, Any]) -> BinaryIO:
        """The Word file, built into a file in the spool folder that is deleted at once (it lives
        until the returned handle, rewound, is closed): a large document's DOCX is tens of MB."""
        path = self._store.spool_path()
        handle = path.open("w+b")
        path.unlink()  # nothing to clean up, whatever happens next
        try:
            write_docx(result, self.crops(record), handle)
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle


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
        self._exports = Exports(store)
        # A DOCX takes a thread for seconds (13 ms a page): the few built at once leave the thread
        # pool to the store writes and reads every task and download needs.
        self._docx_builds = asyncio.Semaphore(_DOCX_BUILDS_AT_ONCE)

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

    async def chunks(
        self,
        record: TaskRecord,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        overlap: int = DEFAULT_OVERLAP,
        tokenizer: str | None = None,
    ) -> Iterator[bytes]:
        """``chunks.json`` of a succeeded task, split with these limits and counted by ``tokenizer``
        (a Hugging Face repository id in the local cache; None or ``"chars"``: an estimate), produced
        as it is iterated (CPU work: iterate in a thread). Figure links point at the image route.

        Everything that can be refused is refused before the first byte: ``InvalidOptions`` for
        bad limits or a tokenizer that is not cached, then ``TaskNotFinished``.
        """
        check_limits(max_tokens, overlap)
        # From the Hugging Face cache the model loads from (HF_HUB_CACHE, else HF_HOME/hub).
        counter = await asyncio.to_thread(load_counter, tokenizer)
        record.require_succeeded()
        result = await asyncio.to_thread(self._exports.read_result, record)
        link_base = f"/v1/tasks/{record.task_id}/images/"
        return stream_chunks_json(
            result, counter, max_tokens=max_tokens, overlap=overlap, link_base=link_base
        )

    async def html(self, record: TaskRecord) -> Iterator[bytes]:
        """``result.html`` of a succeeded task, produced as it is iterated (CPU work and crop reads:
        iterate in a thread). Raises ``TaskNotFinished`` before the task succeeded."""
        record.require_succeeded()
        result = await asyncio.to_thread(self._exports.read_result, record)
        return stream_html(result, self._exports.crops(record))

    async def docx(self, record: TaskRecord) -> BinaryIO:
        """``result.docx`` of a succeeded task, built in a thread into a temporary file that is gone
        once the returned stream is closed (the caller closes it). Raises ``TaskNotFinished``."""
        record.require_succeeded()
        async with self._docx_builds:
            result = await asyncio.to_thread(self._exports.read_result, record)
            return await asyncio.to_thread(self._exports.docx_file, record, result)

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
        return archive_chunks(self._store, record, self._exports)

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
        handle = await asyncio.to_thread(open_result, self._store, record, offered.name, self._exports)
        return handle, offered.content_type


def _check_offered(record: TaskRecord, file: str) -> ResultFile:
    """The stored file ``file`` names (as stored, or by its route's name: ``result.md``)."""
    stored = ROUTE_NAMES.get(file, file)
    for offered in result_files(record):
        if offered.name == stored:
            return offered
    raise ResultNotFound(f"task {record.task_id} has no result named {file!r}")
