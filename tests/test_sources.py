"""Uploads parsed from real multipart bodies; URL fetches from a real server on 127.0.0.1."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pymupdf
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from app.addresses import GuardedTransport, is_public_address
from app.documents import DocumentKind
from app.errors import (
    InvalidDocument,
    InvalidOptions,
    PayloadTooLarge,
    UnsupportedMediaType,
    UrlFetchFailed,
    UrlNotAllowed,
)
from app.pipeline.sources import (
    MAX_FIELD_BYTES,
    MULTIPART_OVERHEAD,
    clean_filename,
    fetch_url,
    receive_multipart,
)
from tests.servers import ThreadedServer


def _pdf_bytes(pages: int = 1) -> bytes:
    with pymupdf.open() as document:
        for _ in range(pages):
            document.new_page().insert_text((72, 72), "hello")
        return document.tobytes()


PDF = _pdf_bytes()

# --- uploads --------------------------------------------------------------------------------------


def _multipart(files: Any, data: dict[str, str] | None = None) -> tuple[str, bytes]:
    """Encode a form the way a real client does; returns its Content-Type and body."""
    request = httpx.Request("POST", "http://upload.test/", files=files, data=data)
    return request.headers["content-type"], request.read()


class _Body:
    """An ASGI-like body stream in fixed-size chunks that records how much was read."""

    def __init__(self, body: bytes, chunk: int = 1000) -> None:
        self.body, self.chunk, self.read = body, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.body), self.chunk):
            piece = self.body[start : start + self.chunk]
            self.read += len(piece)
            yield piece


async def test_an_upload_is_streamed_to_dest_with_its_fields(tmp_path: Path) -> None:
    content_type, body = _multipart(
        {"file": ("Report 2024.pdf", PDF, "application/pdf")}, {"options": '{"mode": "free"}', "pages": "1-2"}
    )
    dest = tmp_path / "spool"
    form = await receive_multipart(content_type, str(len(body)), _Body(body), dest, max_bytes=len(PDF))
    assert dest.read_bytes() == PDF
    assert form.file.path == dest
    assert form.file.filename == "Report 2024.pdf"
    assert form.file.size_bytes == len(PDF)
    assert form.file.kind is DocumentKind.PDF
    assert form.fields == {"options": '{"mode": "free"}', "pages": "1-2"}


async def test_an_upload_split_into_tiny_chunks_parses_the_same(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("a.pdf", PDF)}, {"mode": "document"})
    form = await receive_multipart(
        content_type, None, _Body(body, chunk=7), tmp_path / "spool", max_bytes=10**6
    )
    assert (tmp_path / "spool").read_bytes() == PDF
    assert form.fields == {"mode": "document"}


async def test_an_oversized_content_length_is_refused_before_reading(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("a.pdf", PDF)})
    stream = _Body(body)
    declared = str(len(PDF) - 100 + MULTIPART_OVERHEAD + 1)
    with pytest.raises(PayloadTooLarge):
        await receive_multipart(content_type, declared, stream, tmp_path / "spool", max_bytes=len(PDF) - 100)
    assert stream.read == 0
    assert not (tmp_path / "spool").exists()


async def test_an_oversized_file_without_content_length_stops_at_the_limit(tmp_path: Path) -> None:
    big = PDF + b"\0" * 300_000
    content_type, body = _multipart({"file": ("big.pdf", big)})
    stream = _Body(body, chunk=10_000)
    with pytest.raises(PayloadTooLarge, match="100000 bytes"):
        await receive_multipart(content_type, None, stream, tmp_path / "spool", max_bytes=100_000)
    assert stream.read < 100_000 + 2 * stream.chunk  # stopped at the limit, not at the end
    assert not (tmp_path / "spool").exists()


async def test_a_content_length_that_lies_does_not_help(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("big.pdf", PDF + b"\0" * 300_000)})
    with pytest.raises(PayloadTooLarge):
        await receive_multipart(content_type, "1000", _Body(body), tmp_path / "spool", max_bytes=100_000)
    assert not (tmp_path / "spool").exists()


async def test_an_upload_without_a_file_part_is_refused(tmp_path: Path) -> None:
    content_type, body = _multipart({"document": ("a.txt", b"x")}, {"mode": "free"})
    with pytest.raises(InvalidOptions, match="the multipart body has no 'file' part"):
        await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    assert not (tmp_path / "spool").exists()


async def test_a_body_that_is_not_multipart_is_unsupported(tmp_path: Path) -> None:
    with pytest.raises(
        UnsupportedMediaType,
        match="expected a multipart/form-data body with a 'file' part, got application/json",
    ):
        await receive_multipart("application/json", "2", _Body(b"{}"), tmp_path / "spool", max_bytes=10**6)
    with pytest.raises(UnsupportedMediaType, match="got none"):
        await receive_multipart(None, None, _Body(b""), tmp_path / "spool", max_bytes=10**6)


async def test_a_malformed_or_cut_multipart_body_is_refused(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("a.pdf", PDF)})
    with pytest.raises(InvalidOptions, match="ended before its closing boundary"):
        await receive_multipart(content_type, None, _Body(body[:-50]), tmp_path / "spool", max_bytes=10**6)
    with pytest.raises(InvalidOptions, match="has no boundary"):
        await receive_multipart("multipart/form-data", None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    with pytest.raises(InvalidOptions, match="boundary is unusable"):
        await receive_multipart(
            f"multipart/form-data; boundary={'b' * 300}",
            None,
            _Body(body),
            tmp_path / "spool",
            max_bytes=10**6,
        )
    with pytest.raises(InvalidOptions, match="malformed"):
        await receive_multipart(
            content_type, None, _Body(b"garbage" * 100), tmp_path / "spool", max_bytes=10**6
        )
    assert not (tmp_path / "spool").exists()


async def test_a_file_of_an_unsupported_kind_is_refused_and_deleted(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("notes.pdf", b"just some text, not a PDF")})
    with pytest.raises(UnsupportedMediaType, match="not a PDF, PNG, JPEG, WebP, TIFF or BMP"):
        await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    assert not (tmp_path / "spool").exists()


async def test_an_empty_file_is_an_invalid_document(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("empty.pdf", b"")})
    with pytest.raises(InvalidDocument, match="empty"):
        await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    assert not (tmp_path / "spool").exists()


async def test_form_fields_are_capped(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("a.pdf", PDF)}, {"options": "x" * MAX_FIELD_BYTES})
    with pytest.raises(InvalidOptions, match="exceed"):
        await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)


async def test_a_second_file_part_is_refused(tmp_path: Path) -> None:
    content_type, body = _multipart([("file", ("a.pdf", PDF)), ("file", ("b.pdf", PDF))])
    with pytest.raises(InvalidOptions, match="more than one 'file' part"):
        await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    assert not (tmp_path / "spool").exists()


async def test_an_upload_without_a_filename_is_named_from_its_kind(tmp_path: Path) -> None:
    content_type, body = _multipart({"file": ("", PDF)})
    form = await receive_multipart(content_type, None, _Body(body), tmp_path / "spool", max_bytes=10**6)
    assert form.file.filename == "document.pdf"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("report.pdf", "report.pdf"),
        ("../../etc/passwd.pdf", "passwd.pdf"),
        ("C:\\Users\\me\\scan.pdf", "scan.pdf"),
        ("evil\x00name\r\n.pdf", "evilname.pdf"),
        ("invoice\u202egnp.pdf", "invoicegnp.pdf"),  # a right-to-left override hides the real extension
        ("", "document.pdf"),
        (None, "document.pdf"),
        ("..", "document.pdf"),
        ("scan", "scan.pdf"),
        ("v1.2 final", "v1.2 final.pdf"),
        ("résumé.pdf", "résumé.pdf"),
        ("a" * 300 + ".pdf", "a" * 196 + ".pdf"),
    ],
)
def test_clean_filename(raw: str | None, expected: str) -> None:
    assert clean_filename(raw, DocumentKind.PDF) == expected


# --- the address guard ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (CGNAT)
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "fd00::1",
        "fe80::1",
        "ff02::1",
        "2001:db8::1",
        "2002:c0a8:0101::1",  # 6to4 carrying 192.168.1.1
        "64:ff9b::7f00:1",  # NAT64 carrying 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_public_address(address)


# --- URL fetches from a real server ---------------------------------------------------------------


async def _slow(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield PDF[:100]
        await anyio.sleep(1)  # far past the client's read timeout
        yield PDF[100:]

    return StreamingResponse(body(), media_type="application/pdf")


async def _chunked(request: Request) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        yield PDF
        for _ in range(20):
            yield b"\0" * 65536

    return StreamingResponse(body(), media_type="application/pdf")  # no Content-Length


def _redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(request.query_params["to"], status_code=302)


_APP = FastAPI(
    routes=[
        Route(
            "/doc.pdf",
            lambda request: Response(
                PDF,
                media_type="application/pdf",
                headers={"content-disposition": 'attachment; filename="report.pdf"'},
            ),
        ),
        Route(
            "/download",
            lambda request: Response(
                PDF, headers={"content-disposition": "attachment; filename*=UTF-8''na%C3%AFve%20plan.pdf"}
            ),
        ),
        Route("/files/{name}", lambda request: Response(PDF, media_type="application/octet-stream")),
        Route("/text", lambda request: Response("plain words", media_type="text/plain")),
        Route("/empty", lambda request: Response(b"", media_type="application/pdf")),
        Route("/large", lambda request: Response(PDF + b"\0" * 300_000, media_type="application/pdf")),
        Route("/chunked", _chunked),
        Route("/slow", _slow),
        Route("/redirect", _redirect),
        Route("/loop", lambda request: RedirectResponse("/loop", status_code=302)),
        Route(
            "/bad-redirect", lambda request: Response(status_code=302, headers={"location": "http://x:port/"})
        ),
    ]
)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """Serve ``_APP`` with uvicorn on 127.0.0.1; yields its base URL."""
    with ThreadedServer(_APP) as running:
        yield running.url


async def _fetch(url: str, dest: Path, **overrides: Any) -> Any:
    options: dict[str, Any] = {
        "max_bytes": 10**6,
        "allow_private": True,
        "connect_timeout": 2.0,
        "read_timeout": 2.0,
        "max_redirects": 3,
    } | overrides
    return await fetch_url(url, dest, **options)


async def test_a_loopback_url_is_refused_by_default(server: str, tmp_path: Path) -> None:
    with pytest.raises(UrlNotAllowed, match=re.escape("127.0.0.1")):
        await _fetch(f"{server}/doc.pdf", tmp_path / "spool", allow_private=False)
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("host", ["localhost", "[::1]", "[::ffff:127.0.0.1]"])
async def test_other_names_for_loopback_are_refused(server: str, tmp_path: Path, host: str) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(UrlNotAllowed, match="non-public address"):
        await _fetch(f"http://{host}:{port}/doc.pdf", tmp_path / "spool", allow_private=False)


async def test_a_loopback_url_is_fetched_when_private_hosts_are_allowed(server: str, tmp_path: Path) -> None:
    received = await _fetch(f"{server}/doc.pdf", tmp_path / "spool")
    assert (tmp_path / "spool").read_bytes() == PDF
    assert received.filename == "report.pdf"
    assert received.size_bytes == len(PDF)
    assert received.kind is DocumentKind.PDF


async def test_the_filename_comes_from_rfc_2231_disposition_or_the_path(server: str, tmp_path: Path) -> None:
    assert (await _fetch(f"{server}/download", tmp_path / "a")).filename == "naïve plan.pdf"
    assert (await _fetch(f"{server}/files/scan%20one", tmp_path / "b")).filename == "scan one.pdf"


async def test_redirects_are_followed(server: str, tmp_path: Path) -> None:
    received = await _fetch(f"{server}/redirect?to=/doc.pdf", tmp_path / "spool")
    assert received.filename == "report.pdf"


async def test_a_redirect_to_a_private_address_is_refused(server: str, tmp_path: Path) -> None:
    class PublicHost(httpx.AsyncBaseTransport):
        """Plays a public host (there is no internet here) that redirects to the test server."""

        def __init__(self) -> None:
            self.guarded = GuardedTransport(allow_private=False)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.host == "public.example":
                return httpx.Response(302, headers={"location": f"{server}/doc.pdf"})
            return await self.guarded.handle_async_request(request)

        async def aclose(self) -> None:
            await self.guarded.aclose()

    with pytest.raises(UrlNotAllowed, match=re.escape("127.0.0.1")):
        await _fetch(
            "http://public.example/start", tmp_path / "spool", allow_private=False, transport=PublicHost()
        )
    assert not (tmp_path / "spool").exists()


async def test_a_redirect_to_another_scheme_is_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(UrlNotAllowed, match="not file"):
        await _fetch(f"{server}/redirect?to=file:///etc/passwd", tmp_path / "spool")


async def test_a_redirect_to_a_malformed_url_fails(server: str, tmp_path: Path) -> None:
    with pytest.raises(UrlFetchFailed, match="Invalid URL in location header"):
        await _fetch(f"{server}/bad-redirect", tmp_path / "spool")


async def test_too_many_redirects_fail(server: str, tmp_path: Path) -> None:
    with pytest.raises(UrlFetchFailed, match="redirected more than 3 times"):
        await _fetch(f"{server}/loop", tmp_path / "spool")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/a.pdf", "file:///etc/passwd", "/relative.pdf", "http://", "http://x:port/"]
)
async def test_only_http_urls_are_fetched(tmp_path: Path, url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        await _fetch(url, tmp_path / "spool")


async def test_an_error_status_fails_naming_status_and_host(server: str, tmp_path: Path) -> None:
    with pytest.raises(UrlFetchFailed, match=re.escape("127.0.0.1 answered 404 Not Found")):
        await _fetch(f"{server}/missing.pdf", tmp_path / "spool")
    assert not (tmp_path / "spool").exists()


async def test_a_refused_connection_fails(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UrlFetchFailed, match=re.escape("cannot connect to 127.0.0.1")):
        await _fetch(f"http://127.0.0.1:{port}/doc.pdf", tmp_path / "spool")


async def test_an_unresolvable_host_fails(tmp_path: Path) -> None:
    with pytest.raises(UrlFetchFailed, match=re.escape("no-such-host.invalid")):
        await _fetch("http://no-such-host.invalid/doc.pdf", tmp_path / "spool", allow_private=False)


async def test_a_server_that_stops_sending_times_out(server: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(UrlFetchFailed, match="stopped sending data"):
        await _fetch(f"{server}/slow", tmp_path / "spool", read_timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert not (tmp_path / "spool").exists()


async def test_a_declared_size_over_the_limit_is_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        await _fetch(f"{server}/large", tmp_path / "spool", max_bytes=100_000)
    assert not (tmp_path / "spool").exists()


async def test_a_streamed_body_over_the_limit_is_cut_off(server: str, tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        await _fetch(f"{server}/chunked", tmp_path / "spool", max_bytes=100_000)
    assert not (tmp_path / "spool").exists()


async def test_a_download_that_is_not_a_document_is_refused(server: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedMediaType):
        await _fetch(f"{server}/text", tmp_path / "spool")
    with pytest.raises(InvalidDocument, match="empty"):
        await _fetch(f"{server}/empty", tmp_path / "spool")
    assert not (tmp_path / "spool").exists()
