"""Receiving documents: multipart uploads and URL downloads, streamed to disk under a size limit.

Neither path holds a whole body in memory, and both decide the document's kind from its bytes.
URL fetches reach public addresses only (unless allowed otherwise); the check runs where the socket
is opened, on the address actually connected to, so DNS rebinding and redirects cannot get around
it.
"""

from __future__ import annotations

import email.message
import os
import re
import unicodedata
from collections.abc import AsyncIterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import anyio
import httpx
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from app.addresses import GuardedTransport
from app.documents import DocumentKind
from app.errors import (
    InvalidDocument,
    InvalidOptions,
    PayloadTooLarge,
    UnsupportedMediaType,
    UrlFetchFailed,
    UrlNotAllowed,
)
from app.pipeline.sniff import SNIFF_BYTES, sniff

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MULTIPART_OVERHEAD = 64 * 1024  # bytes a multipart body may carry beyond the file: boundaries, fields
MAX_FIELD_BYTES = 64 * 1024  # all form fields other than ``file`` together, names included
MAX_FILENAME_CHARS = 200
# Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned, line separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_EXTENSION = re.compile(r"\.[0-9A-Za-z]{1,10}")


@dataclass
class ReceivedFile:
    """A document written to disk, checked to be a supported kind and not empty."""

    path: Path  # where the bytes were written (the caller chose it)
    filename: str  # display name, see ``clean_filename``
    size_bytes: int
    kind: DocumentKind


@dataclass
class UploadForm:
    """A parsed multipart upload: the ``file`` part on disk and the other fields as text."""

    file: ReceivedFile
    fields: dict[str, str]  # e.g. "options" (JSON text), "mode", "pages", "dpi"


# --- uploads --------------------------------------------------------------------------------------


async def receive_multipart(
    content_type: str | None,
    content_length: str | None,
    body: AsyncIterable[bytes],
    dest: Path,
    *,
    max_bytes: int,
) -> UploadForm:
    """Stream a ``multipart/form-data`` body, writing its ``file`` part to ``dest``.

    Raises ``PayloadTooLarge`` before reading when Content-Length passes ``max_bytes`` plus
    ``MULTIPART_OVERHEAD``, and as soon as the file (or the body) passes its limit while streaming;
    ``UnsupportedMediaType`` for a body that is not multipart/form-data or a file of an unsupported
    kind; ``InvalidOptions`` for a malformed body, a missing or repeated ``file`` part, or fields
    over ``MAX_FIELD_BYTES``; ``InvalidDocument`` for an empty file. ``dest`` is deleted on failure.
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1")[:100] or "none"
        raise UnsupportedMediaType(f"expected a multipart/form-data body with a 'file' part, got {shown}")
    limit = max_bytes + MULTIPART_OVERHEAD
    if content_length is not None and content_length.strip().isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(_too_large(max_bytes))
    boundary = params.get(b"boundary")
    if not boundary:
        raise InvalidOptions("the multipart Content-Type has no boundary")
    form = _FormCollector(max_file_bytes=max_bytes)
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError as exc:  # a boundary too long to be a real one
        raise InvalidOptions(f"the multipart boundary is unusable: {exc}") from exc
    try:
        received = 0
        async with await anyio.open_file(dest, "wb") as out:
            async for chunk in body:
                received += len(chunk)
                if received > limit:  # no Content-Length (chunked), or a lying one
                    raise PayloadTooLarge(_too_large(max_bytes))
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise InvalidOptions(f"the multipart body is malformed: {exc}") from exc
                if form.pending:
                    await out.write(b"".join(form.pending))
                    form.pending.clear()
        if not form.finished:
            raise InvalidOptions("the multipart body ended before its closing boundary")
        if form.filename is None:
            raise InvalidOptions("the multipart body has no 'file' part")
        file = await _checked_file(dest, form.filename, form.file_size)
    except BaseException:
        await _discard(dest)
        raise
    return UploadForm(file=file, fields=form.fields)


class _FormCollector:
    """Receives python-multipart's callbacks: file bytes wait in ``pending``, fields are kept as text.

    Limits are enforced inside the callbacks, so a part never grows past them by more than the
    chunk being parsed. The exceptions raised there propagate out of ``MultipartParser.write``.
    """

    def __init__(self, *, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # the file part's filename ("" if it had none), once seen
        self.file_size = 0
        self.pending: list[bytes] = []  # file bytes parsed but not yet written
        self.finished = False  # the closing boundary was seen
        self._field_bytes = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._part_name = ""
        self._in_file = False
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._disposition = b""
        self._value.clear()

    def _on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        # Bytes in, bytes out (latin-1 both ways), so UTF-8 names survive to be decoded here.
        _, params = parse_options_header(self._disposition)
        if b"name" not in params:
            raise InvalidOptions("a multipart part has no name in its Content-Disposition")
        self._part_name = params[b"name"].decode("utf-8", "replace")
        self._in_file = self._part_name == "file"
        if self._in_file:
            if self.filename is not None:
                raise InvalidOptions("the multipart body has more than one 'file' part")
            self.filename = params.get(b"filename", b"").decode("utf-8", "replace")
        elif self._part_name in self.fields:
            raise InvalidOptions(f"the form field {self._part_name!r} is repeated")
        else:
            self._count_field_bytes(len(self._part_name))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.file_size += end - start
            if self.file_size > self.max_file_bytes:
                raise PayloadTooLarge(_too_large(self.max_file_bytes))
            self.pending.append(data[start:end])
        else:
            self._count_field_bytes(end - start)
            self._value.extend(data[start:end])

    def _on_part_end(self) -> None:
        if self._in_file:
            return
        try:
            self.fields[self._part_name] = self._value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidOptions(f"the form field {self._part_name!r} is not UTF-8 text") from exc

    def _on_end(self) -> None:
        self.finished = True

    def _count_field_bytes(self, count: int) -> None:
        self._field_bytes += count
        if self._field_bytes > MAX_FIELD_BYTES:
            raise InvalidOptions(f"the form fields other than 'file' exceed {MAX_FIELD_BYTES} bytes")


# --- URL downloads --------------------------------------------------------------------------------


async def fetch_url(
    url: str,
    dest: Path,
    *,
    max_bytes: int,
    allow_private: bool,
    connect_timeout: float,
    read_timeout: float,
    max_redirects: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ReceivedFile:
    """Download an http(s) URL to ``dest``, following up to ``max_redirects`` redirects.

    ``read_timeout`` bounds each wait for data, not the whole download. Raises ``UrlNotAllowed``
    for a scheme other than http(s) on any hop, or a host that resolves to a non-public address
    (unless ``allow_private``); ``UrlFetchFailed`` when a host is unreachable, times out, answers
    with a non-2xx status or redirects too often; ``PayloadTooLarge`` past ``max_bytes``; and as
    for uploads, ``UnsupportedMediaType`` or ``InvalidDocument``. ``dest`` is deleted on failure.
    ``transport`` replaces the default ``GuardedTransport`` (and its address check) in tests.
    """
    current = _http_url(url)
    client = httpx.AsyncClient(
        transport=transport or GuardedTransport(allow_private=allow_private),
        timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        trust_env=False,  # no proxy or .netrc from the environment may redirect or credential this
        headers={"accept-encoding": "identity"},  # so the size limit counts what is stored
    )
    async with client:
        for _ in range(max_redirects + 1):
            with _fetch_errors(current):
                async with client.stream("GET", current) as response:
                    if response.is_redirect:
                        current = _http_url(response.headers["location"], base=response.url)
                        continue
                    if not response.is_success:
                        raise UrlFetchFailed(
                            f"{current.host} answered {response.status_code} {response.reason_phrase}"
                        )
                    try:
                        size = await _download(response, dest, max_bytes)
                        return await _checked_file(dest, _response_filename(response), size)
                    except BaseException:
                        await _discard(dest)
                        raise
    raise UrlFetchFailed(f"the URL redirected more than {max_redirects} times")


def _http_url(raw: str, *, base: httpx.URL | None = None) -> httpx.URL:
    """Parse ``raw`` (relative to ``base``, for a redirect); refuse all but absolute http(s) URLs."""
    try:
        url = base.join(raw) if base is not None else httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise UrlNotAllowed(f"not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise UrlNotAllowed(f"only http and https URLs can be fetched, not {url.scheme or 'a relative URL'}")
    if not url.host:
        raise UrlNotAllowed("the URL has no host")
    return url


@contextmanager
def _fetch_errors(url: httpx.URL) -> Iterator[None]:
    """Translate httpx's errors for one hop into ``UrlFetchFailed`` naming its host."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise UrlFetchFailed(f"connecting to {url.host} timed out") from exc
    except httpx.TimeoutException as exc:
        raise UrlFetchFailed(f"{url.host} stopped sending data (timed out)") from exc
    except httpx.ConnectError as exc:
        raise UrlFetchFailed(f"cannot connect to {url.host}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise UrlFetchFailed(f"fetching from {url.host} failed: {exc}") from exc


async def _download(response: httpx.Response, dest: Path, max_bytes: int) -> int:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(_too_large(max_bytes))
    size = 0
    async with await anyio.open_file(dest, "wb") as out:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(_too_large(max_bytes))
            await out.write(chunk)
    return size


def _response_filename(response: httpx.Response) -> str:
    message = email.message.Message()  # parses RFC 2231 ``filename*=UTF-8''...`` too
    message["content-disposition"] = response.headers.get("content-disposition", "")
    return message.get_filename() or PurePosixPath(response.url.path).name


# --- shared ---------------------------------------------------------------------------------------


def clean_filename(raw: str | None, kind: DocumentKind) -> str:
    """Return a safe display name for a received document.

    Keeps the last path component of ``raw`` (after ``/`` or ``\\``), drops control, format and line
    separator characters and leading or trailing dots and spaces, adds the kind's extension to a
    name without one, and cuts the name to ``MAX_FILENAME_CHARS``, keeping its extension.
    ``"document"`` stands in for a name that is missing or empty.
    """
    name = re.split(r"[/\\]", raw or "")[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch) not in _UNSAFE_CATEGORIES).strip(" .")
    name = name or "document"
    stem, suffix = os.path.splitext(name)
    if not _EXTENSION.fullmatch(suffix):  # "scan", or "v1.2 final": no extension to keep
        stem, suffix = name, kind.extension
    return stem[: MAX_FILENAME_CHARS - len(suffix)].rstrip(" .") + suffix


async def _checked_file(path: Path, raw_name: str, size: int) -> ReceivedFile:
    """Sniff a written file; refuse it if empty or of an unsupported kind."""
    if size == 0:
        raise InvalidDocument("the document is empty")
    async with await anyio.open_file(path, "rb") as handle:
        head = await handle.read(SNIFF_BYTES)
    kind = sniff(head)
    if kind is None:
        raise UnsupportedMediaType("the document is not a PDF, PNG, JPEG, WebP, TIFF or BMP file")
    return ReceivedFile(path=path, filename=clean_filename(raw_name, kind), size_bytes=size, kind=kind)


async def _discard(path: Path) -> None:
    # Shielded: when the request is cancelled (the client went away) the partial file must still go.
    with anyio.CancelScope(shield=True):
        await anyio.Path(path).unlink(missing_ok=True)


def _too_large(max_bytes: int) -> str:
    return f"the document is larger than the limit of {max_bytes} bytes ({max_bytes / 2**20:g} MiB)"
