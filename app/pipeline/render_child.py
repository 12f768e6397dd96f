"""A render process: opens, checks and renders documents for ``RenderPool``, one request at a time.

Started as ``python -m app.pipeline.render_child MEMORY_MB PARENT_PID PIXELS_FD``. It caps its own
address space at ``MEMORY_MB`` (``RLIMIT_AS``), dies with the service, reads requests on stdin and
answers on its own copy of stdout; stdout itself is pointed at stderr, so a library that prints
cannot corrupt an answer. The service kills it when a request runs past its deadline.

A frame is a 4-byte big-endian length and a JSON object. A rendered page goes into the shared file
``PIXELS_FD`` (a memfd), from offset 0, losslessly encoded (``app.lossless``): the service
decodes it only for the pages that need pixels there (figure crops, an engine in the service's
process), and the raw
pixels (6 MB a page) would cost both processes a copy for every page. JSON rather than pickle: a
process subverted by a crafted document must not be able to run code in the service by what it
answers.

Requests: ``{"op": "inspect", "path", "kind", "spec", "max_pages", "max_pixels"}`` answers
``{"ok": true, "page_count", "numbers"}``; ``{"op": "render", "path", "kind", "number", "dpi",
"max_pixels"}`` answers ``{"ok": true, "width", "height", "dpi", "encoded", "text", "has_ink"}``:
``encoded`` bytes of the page as ``lossless.encode`` makes it are in the shared file (the image the
engine is sent and previews are made from: encoding it here, in parallel with the service, is most
of a page's cost), then ``text`` bytes of its text layer in UTF-8 (``null``: none; in the file,
not the JSON, which would swell a CJK page's 200,000 characters past ``MAX_HEADER_BYTES``). A
refusal answers ``{"ok": false, "error": <class name in app.errors>, "message"}``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import signal
import struct
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymupdf

from app import lossless, malloc
from app.documents import DocumentKind
from app.errors import DsocrError, InvalidDocument, RenderMemoryExceeded
from app.pipeline.pages import Document, inspect_document, open_document

LENGTH = struct.Struct(">I")  # the length of each frame's JSON
MAX_HEADER_BYTES = 1 << 20  # a JSON frame longer than this is a broken peer, not a message

_STDIN = 0
# A document kept open for the next page is closed after this long without a request, so that a
# deleted input's disk space comes back (s).
_IDLE_CLOSE_SECONDS = 30.0
# Renders yield the CPU to the service's event loop and to recognition when cores are short.
_NICENESS = 5
_KEPT_BLOCK_BYTES = 16 << 20  # the largest block the heap serves (RGBX: a 144 dpi A3 page is 15.5 MB)
_KEPT_FREE_BYTES = 64 << 20  # the most freed heap kept for the next page
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

_Work = Callable[[dict[str, Any]], dict[str, Any]]


class _Pages:
    """Renders pages, keeping the last document open: a task's pages come one after another."""

    def __init__(self, pixels: int) -> None:
        self._pixels = pixels  # the shared file's descriptor
        self._key: tuple[str, str, int, int, int] | None = None  # a new file at the same path differs
        self._document: Document | None = None

    def render(self, request: dict[str, Any]) -> dict[str, Any]:
        document = self._open(request["path"], request["kind"])
        page = document.render(request["number"], dpi=request["dpi"], max_pixels=request["max_pixels"])
        encoded = lossless.encode(page.image)
        # MuPDF hands back lone surrogates of a crafted ToUnicode map as U+FFFD: this always encodes.
        text = b"" if page.text_layer is None else page.text_layer.encode()
        # Truncating first gives back the pages of a larger page before it.
        os.ftruncate(self._pixels, len(encoded) + len(text))
        _write_at(self._pixels, encoded, 0)
        _write_at(self._pixels, text, len(encoded))
        width, height = page.image.size
        return {
            "ok": True,
            "width": width,
            "height": height,
            "dpi": page.dpi,
            "encoded": len(encoded),
            "text": None if page.text_layer is None else len(text),
            "has_ink": page.has_ink,
        }

    def _open(self, path: str, kind: str) -> Document:
        stat = os.stat(path)
        key = (path, kind, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self._document is None or key != self._key:
            self.close()
            self._document = open_document(Path(path), DocumentKind(kind))
            self._key = key
        return self._document

    def close(self) -> None:
        if self._document is not None:
            self._document.close()
        self._document, self._key = None, None


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        view = view[os.pwrite(fd, view, offset + len(data) - len(view)) :]


def main(argv: list[str]) -> None:
    memory_mb, parent, pixels = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the service decides
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with contextlib.suppress(OSError):
        os.nice(_NICENESS)
    # Keep freed pages' pixels for the next page instead of giving them back: glibc's own
    # thresholds trimmed and mapped them afresh for every page, whose first touches of 6-8 MB
    # (MuPDF clearing its pixmap, Pillow copying it) then cost ~4,600 page faults: 40 pages of a
    # manual at 144 dpi rendered in 4.5 ms and copied into Pillow in 7.5 ms a page; with these,
    # 1.7 and 1.3 ms, 83 faults. Larger blocks (a page over 16 MiB) still get mappings of their
    # own, given back when freed, and at most 64 MiB of freed heap is kept.
    malloc.set_thresholds(mmap_bytes=_KEPT_BLOCK_BYTES, trim_bytes=_KEPT_FREE_BYTES)
    replies = os.dup(1)
    os.dup2(2, 1)
    # Warnings about a damaged file are the user's answer, not the operator's log.
    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)
    _write(replies, {"ready": True})
    pages = _Pages(pixels)
    while True:
        readable, _, _ = select.select([_STDIN], [], [], _IDLE_CLOSE_SECONDS)
        if not readable:
            pages.close()
            continue
        request = _read(_STDIN)
        if request is None:
            return  # the service closed our stdin: it is stopping
        work = pages.render if request["op"] == "render" else _inspect
        _write(replies, _answer(request, work))


def _die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when the service dies, even in the middle of a render."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the request above took effect
        os._exit(1)


def _inspect(request: dict[str, Any]) -> dict[str, Any]:
    inspection = inspect_document(
        Path(request["path"]),
        DocumentKind(request["kind"]),
        request["spec"],
        max_pages=request["max_pages"],
        max_pixels=request["max_pixels"],
    )
    return {"ok": True, "page_count": inspection.page_count, "numbers": inspection.numbers}


def _answer(request: dict[str, Any], work: _Work) -> dict[str, Any]:
    """Run ``work`` on ``request`` and turn what it raises into a refusal naming the page or the
    document."""
    subject = f"page {request['number']}" if request["op"] == "render" else "the document"
    try:
        return work(request)
    except DsocrError as exc:
        return _refusal(exc)
    except MemoryError:
        return _refusal(RenderMemoryExceeded(f"{subject} needs more memory than a render process may use"))
    except Exception as exc:
        # A library's own bug on a crafted file (Pillow's plugins raise many things): the document
        # cannot be read, and this process stays up for the next one. The trace goes to the log.
        traceback.print_exc()
        return _refusal(InvalidDocument(f"{subject} cannot be read: {type(exc).__name__}"))


def _refusal(error: DsocrError) -> dict[str, Any]:
    return {"ok": False, "error": type(error).__name__, "message": error.message}


def _read(fd: int) -> dict[str, Any] | None:
    """The next request, or ``None`` at the end of input."""
    head = _read_exactly(fd, LENGTH.size)
    if head is None:
        return None
    (length,) = LENGTH.unpack(head)
    body = _read_exactly(fd, length)
    if body is None:
        return None
    request: dict[str, Any] = json.loads(body)
    return request


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks: list[bytes] = []
    while size:
        chunk = os.read(fd, size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _write(fd: int, answer: dict[str, Any]) -> None:
    body = json.dumps(answer).encode()
    view = memoryview(LENGTH.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    main(sys.argv[1:])
