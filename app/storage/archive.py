"""The files a succeeded task offers (to download, publish or share), and the zip of them.

The zip is built while it is read (zipstream-ng): each member is read from its file in chunks when
the stream reaches it, so neither the archive nor any member is ever held in memory whole. PNGs and
the DOCX are stored (they are compressed already), Markdown, JSON and HTML deflated.

The exports (``EXPORT_FILES``: chunks.json, result.html, result.docx) are not stored: they are
built from the stored files when read, by an ``ExportBuilder`` the caller passes in (the formats
live above this layer, in ``app.formats``, and are driven from ``app.tasks.downloads``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from zipstream import ZipStream

from app.records import TaskRecord
from app.result_files import ARCHIVE_NAME, ARCHIVE_TYPE, EXPORT_FILES, IMAGE_TYPE, RESULT_FILES
from app.storage.base import TaskStore

CHUNK = 64 * 1024
# Members stored as they are in the zip: deflating compressed data again gains nothing.
_COMPRESSED = {IMAGE_TYPE, EXPORT_FILES["result.docx"]}


class ExportBuilder(Protocol):
    """Builds the exports of a succeeded task from its stored results."""

    def build(self, record: TaskRecord, name: str) -> Iterator[bytes]:
        """The bytes of export ``name`` (a key of ``EXPORT_FILES``), produced as they are iterated
        (blocking: iterate in a thread). Store reads fail from the iteration (``ResultNotFound``)."""
        ...


@dataclass(frozen=True)
class ResultFile:
    # "full.md", "layout.json", "result.json", "chunks.json", "result.html", "result.docx",
    # "result.zip" or "images/pNNNN_NN.png"
    name: str
    content_type: str


def result_files(record: TaskRecord) -> list[ResultFile]:
    """Every file a succeeded task offers, the exports and the zip included, in a stable order."""
    files = [ResultFile(name, content_type) for name, content_type in RESULT_FILES.items()]
    files.extend(ResultFile(name, content_type) for name, content_type in EXPORT_FILES.items())
    files.append(ResultFile(ARCHIVE_NAME, ARCHIVE_TYPE))
    files.extend(ResultFile(f"images/{image}", IMAGE_TYPE) for image in record.images)
    return files


def archive_chunks(store: TaskStore, record: TaskRecord, exports: ExportBuilder) -> Iterator[bytes]:
    """The zip of ``full.md``, ``layout.json``, ``result.json``, the exports (built by ``exports``
    when the stream reaches them) and ``images/``, as it is produced.

    Blocking reads: iterate in a thread (Starlette does so for a plain iterator). Every member is
    read by ``record`` as given, which is not read again. A file that vanishes meanwhile (the task
    expired) raises ``ResultNotFound`` from the iteration.
    """
    stream = ZipStream(compress_type=zipfile.ZIP_DEFLATED)
    for file in result_files(record):
        if file.name == ARCHIVE_NAME:
            continue
        stream.add(
            _member(store, record, file.name, exports),
            file.name,
            compress_type=zipfile.ZIP_STORED if file.content_type in _COMPRESSED else None,
        )
    yield from stream


def open_result(store: TaskStore, record: TaskRecord, name: str, exports: ExportBuilder) -> BinaryIO:
    """A readable stream of one result file; ``result.zip`` and the exports are built as they are
    read.

    Raises ``ResultNotFound`` for a name the task does not offer. Blocking; the caller closes it.
    """
    if name == ARCHIVE_NAME:
        return io.BufferedReader(_IteratorReader(archive_chunks(store, record, exports)), CHUNK)
    if name in EXPORT_FILES:
        return io.BufferedReader(_IteratorReader(exports.build(record, name)), CHUNK)
    return store.open_result(record, name)


def _member(store: TaskStore, record: TaskRecord, name: str, exports: ExportBuilder) -> Iterator[bytes]:
    # A generator: nothing is opened or built until the zip stream reaches this member.
    if name in EXPORT_FILES:
        yield from exports.build(record, name)
    else:
        yield from _file_chunks(store, record, name)


def _file_chunks(store: TaskStore, record: TaskRecord, name: str) -> Iterator[bytes]:
    # Opened only when the zip stream reaches this member, so at most one file is open at a time.
    with store.open_result(record, name) as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


class _IteratorReader(io.RawIOBase):
    """A read-only, non-seekable file over an iterator of byte chunks (for upload APIs that read)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        # Closing the generator closes whichever member file it holds open.
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()
