"""The files a succeeded task offers (to download, publish or share), and the zip of them.

The zip is built while it is read (zipstream-ng): each member is read from its file in chunks when
the stream reaches it, so neither the archive nor any member is ever held in memory whole. PNGs are
stored (they are compressed already), Markdown and JSON deflated.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from zipstream import ZipStream

from app.records import TaskRecord
from app.result_files import ARCHIVE_NAME, ARCHIVE_TYPE, IMAGE_TYPE, RESULT_FILES
from app.storage.base import TaskStore

CHUNK = 64 * 1024


@dataclass(frozen=True)
class ResultFile:
    name: str  # "full.md", "layout.json", "result.json", "result.zip" or "images/pNNNN_NN.png"
    content_type: str


def result_files(record: TaskRecord) -> list[ResultFile]:
    """Every file a succeeded task offers, the zip included, in a stable order."""
    files = [ResultFile(name, content_type) for name, content_type in RESULT_FILES.items()]
    files.append(ResultFile(ARCHIVE_NAME, ARCHIVE_TYPE))
    files.extend(ResultFile(f"images/{image}", IMAGE_TYPE) for image in record.images)
    return files


def archive_chunks(store: TaskStore, record: TaskRecord) -> Iterator[bytes]:
    """The zip of ``full.md``, ``layout.json``, ``result.json`` and ``images/``, as it is produced.

    Blocking reads: iterate in a thread (Starlette does so for a plain iterator). Every member is
    read by ``record`` as given, which is not read again. A file that vanishes meanwhile (the task
    expired) raises ``ResultNotFound`` from the iteration.
    """
    stream = ZipStream(compress_type=zipfile.ZIP_DEFLATED)
    for file in result_files(record):
        if file.name == ARCHIVE_NAME:
            continue
        stored = file.content_type == IMAGE_TYPE
        stream.add(
            _file_chunks(store, record, file.name),
            file.name,
            compress_type=zipfile.ZIP_STORED if stored else None,
        )
    yield from stream


def open_result(store: TaskStore, record: TaskRecord, name: str) -> BinaryIO:
    """A readable stream of one result file; ``result.zip`` is built as it is read.

    Raises ``ResultNotFound`` for a name the task does not offer. Blocking; the caller closes it.
    """
    if name == ARCHIVE_NAME:
        return io.BufferedReader(_IteratorReader(archive_chunks(store, record)), CHUNK)
    return store.open_result(record, name)


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
