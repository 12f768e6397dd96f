"""Crafted documents against a real service: it stays responsive, refuses or fails them clearly,
keeps nothing of a refused upload, and goes on serving the next task.

Every document is built here, byte by byte where a library would not write it: a few kB of nested
form XObjects that render for minutes, a TIFF of 40,000 frames, a PNG padded with a million empty
chunks, PDFs whose page count lies, a large damaged PDF.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from types import TracebackType

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningService
from tests.documents import huge_page_pdf, make_pdf
from tests.servers import wait_for
from tests.test_api_e2e import PAGE_1, finished, upload

RESPONSIVE_SECONDS = 0.1  # the slowest answer /healthz and a status read may give while a document is read


# --- documents --------------------------------------------------------------------------------------


def pdf_from_objects(objects: list[bytes]) -> bytes:
    """A PDF whose objects are numbered from 1 in order (1 must be the catalog), with a correct xref."""
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _stream(dictionary: bytes, data: bytes) -> bytes:
    return b"<<%s/Length %d>>stream\n%s\nendstream" % (dictionary, len(data), data)


def render_bomb(depth: int = 12) -> bytes:
    """One A4 page drawing form XObject ``depth``, each of which draws the one below it four times:
    4**depth copies of a triangle, about 3 kB. Depth 10 takes MuPDF 18 s at 144 dpi; each level
    multiplies that by about four."""
    forms = [_stream(b"/Type/XObject/Subtype/Form/BBox[0 0 100 100]", b"0 0 m 100 100 l 0 100 l h f")]
    quarters = b"".join(
        b"q 0.5 0 0 0.5 %d %d cm /X Do Q " % corner for corner in ((0, 0), (50, 0), (0, 50), (50, 50))
    )
    for level in range(1, depth + 1):
        resources = b"/Resources<</XObject<</X %d 0 R>>>>" % (
            3 + level
        )  # the form below: object 4 is level 0
        forms.append(_stream(b"/Type/XObject/Subtype/Form/BBox[0 0 100 100]" + resources, quarters))
    top, content = 4 + depth, 5 + depth
    return pdf_from_objects(
        [
            b"<</Type/Catalog/Pages 2 0 R>>",
            b"<</Type/Pages/Kids[3 0 R]/Count 1>>",
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]/Resources<</XObject<</X %d 0 R>>>>"
            b"/Contents %d 0 R>>" % (top, content),
            *forms,
            _stream(b"", b"q 5.95 0 0 8.42 0 0 cm /X Do Q"),
        ]
    )


def lying_count_pdf(count: bytes) -> bytes:
    """One page, in a page tree whose /Count says ``count``."""
    return pdf_from_objects(
        [
            b"<</Type/Catalog/Pages 2 0 R>>",
            b"<</Type/Pages/Kids[3 0 R]/Count %s>>" % count,
            b"<</Type/Page/Parent 2 0 R/MediaBox[0 0 200 200]>>",
        ]
    )


def many_frame_tiff(frames: int) -> bytes:
    """A little-endian TIFF of ``frames`` 1x1 grey frames, IFD after IFD, sharing one pixel (126
    bytes a frame)."""
    ifd_size = 2 + 10 * 12 + 4
    pixel = 8 + frames * ifd_size
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for index in range(frames):
        following = 8 + (index + 1) * ifd_size if index + 1 < frames else 0
        # width, height, bits, no compression, black is zero, strip offset, 1 sample, 1 row per
        # strip, strip byte count, chunky
        tags = [(256, 1), (257, 1), (258, 8), (259, 1), (262, 1), (273, pixel), (277, 1), (278, 1)]
        tags += [(279, 1), (284, 1)]
        out += struct.pack("<H", len(tags))
        for tag, value in tags:
            out += struct.pack("<HHII", tag, 4 if tag in (273, 279) else 3, 1, value)
        out += struct.pack("<I", following)
    return bytes(out + b"\x80")


def chunk_padded_png(chunks: int) -> bytes:
    """A 10x10 PNG with ``chunks`` empty private chunks between its header and its pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), "white").save(buffer, format="PNG")
    data = buffer.getvalue()
    header_end = 8 + 25  # the signature, then IHDR: length, tag, 13 bytes, CRC
    empty = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    return data[:header_end] + empty * chunks + data[header_end:]


def marker_padded_jpeg(markers: int) -> bytes:
    """A 10x10 JPEG with ``markers`` empty comment segments between its start and its header."""
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), "white").save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[:2] + b"\xff\xfe\x00\x02" * markers + data[2:]


def damaged_pdf(megabytes: int) -> bytes:
    """A PDF header and ``megabytes`` MiB of objects with wrong stream lengths, no xref, no trailer:
    MuPDF rebuilds the whole file to open it (about 0.1 s per MiB where this was written)."""
    unit = b"2 0 obj\n<</Length 99999>>stream\nxxxxxxxxxxxxxxxx\nendstream\nendobj\n"
    return b"%PDF-1.7\n" + unit * (megabytes * 1024 * 1024 // len(unit)) + b"\n%%EOF\n"


# --- watching the service ----------------------------------------------------------------------------


class Responsiveness:
    """While open, reads each of ``paths`` in turn from a thread, again and again, keeping the
    slowest answer of each; every answer must be 200."""

    def __init__(self, server: RunningService, *paths: str) -> None:
        self._client = httpx.Client(base_url=server.url, headers=server.client.headers, timeout=120)
        self._paths = paths
        self.worst = dict.fromkeys(paths, 0.0)
        self.reads = dict.fromkeys(paths, 0)
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Responsiveness:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for path in self._paths:
                started = time.perf_counter()
                self.statuses.add(self._client.get(path).status_code)
                self.worst[path] = max(self.worst[path], time.perf_counter() - started)
                self.reads[path] += 1
            time.sleep(0.02)

    def assert_responsive(self, min_reads: int) -> None:
        assert self.statuses == {200}
        for path in self._paths:
            assert self.reads[path] >= min_reads, f"{path} was read {self.reads[path]} times only"
            assert self.worst[path] < RESPONSIVE_SECONDS, f"{path} took {self.worst[path]:.3f} s"


# --- tasks ---------------------------------------------------------------------------------------------


def test_a_render_bomb_fails_its_task_naming_the_page_and_the_service_stays_responsive(make_server):
    server = make_server(answers=[PAGE_1], render_processes=1, render_page_seconds=3)
    client = server.client
    bomb = render_bomb()
    assert len(bomb) < 4096

    accepted = upload(client, bomb, "bomb.pdf")
    assert accepted.status_code == 202  # opening and counting it is quick: only its page is a bomb
    task_id = accepted.json()["task_id"]
    started = time.monotonic()
    with Responsiveness(server, "/healthz", f"/v1/tasks/{task_id}") as watch:
        done = finished(client, task_id)
    assert time.monotonic() - started < 20  # the page's 3 s, a process start and a loaded machine
    watch.assert_responsive(min_reads=10)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "render_timeout"
    assert done["error"]["message"].startswith("page 1 took longer than 3 s to render")
    assert "APP_RENDER_PAGE_SECONDS" in done["error"]["message"]

    # The pool's one process was killed with the bomb; its replacement renders the next task.
    healthy = upload(client, make_pdf(2, picture_page=None)).json()
    assert finished(client, healthy["task_id"])["status"] == "succeeded"


def test_a_cancel_stops_a_page_in_the_middle_of_its_render(make_server):
    server = make_server(answers=[PAGE_1], render_processes=1, render_page_seconds=120)
    client = server.client
    task_id = upload(client, render_bomb(), "bomb.pdf").json()["task_id"]
    wait_for(lambda: client.get(f"/v1/tasks/{task_id}").json()["status"] == "running")
    time.sleep(1)  # well into the page: rendering starts as the task does

    asked = time.monotonic()
    assert client.delete(f"/v1/tasks/{task_id}").status_code == 200
    assert wait_for(lambda: client.get(f"/v1/tasks/{task_id}").json()["status"] == "canceled", timeout=10)
    assert time.monotonic() - asked < 3

    # With one render process, the next upload and task could not even be checked before the
    # bomb's 120 s were up had the render gone on.
    asked = time.monotonic()
    healthy = upload(client, make_pdf(1, picture_page=None)).json()
    assert finished(client, healthy["task_id"])["status"] == "succeeded"
    assert time.monotonic() - asked < 60


def test_a_page_past_the_memory_ceiling_fails_its_task_and_the_next_one_succeeds(make_server):
    # 14400 points square: 40 megapixels (APP_MAX_PAGE_PIXELS) once scaled, 120 MB as a pixmap and
    # as much again as an image, more than 300 MiB of address space with the libraries.
    server = make_server(answers=[PAGE_1], render_processes=1, render_memory_mb=300)
    client = server.client
    task_id = upload(client, huge_page_pdf(), "poster.pdf").json()["task_id"]
    done = finished(client, task_id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "render_memory_exceeded"
    assert done["error"]["message"].startswith("page 1 needs more memory than a render process may use")
    assert "300 MiB" in done["error"]["message"]

    healthy = upload(client, make_pdf(1, picture_page=None)).json()
    assert finished(client, healthy["task_id"])["status"] == "succeeded"


# --- uploads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "settings", "code", "message"),
    [
        pytest.param(
            "frames.tiff",
            lambda: many_frame_tiff(40_000),
            {},
            "too_many_pages",
            "the TIFF has more than 500 pages (frames); the limit is 500 (APP_MAX_PAGES)",
            id="40000-frame-tiff",
        ),
        pytest.param(
            "padded.png",
            lambda: chunk_padded_png(1_000_000),
            {},
            "invalid_document",
            "the PNG has more than 1000 chunks before its image data",
            id="chunk-padded-png",
        ),
        pytest.param(
            "padded.jpg",
            lambda: marker_padded_jpeg(1_000_000),
            {},
            "invalid_document",
            "the JPEG has more than 1000 markers before its image data",
            id="marker-padded-jpeg",
        ),
        pytest.param(
            "count-too-high.pdf",
            lambda: lying_count_pdf(b"5"),
            {},
            "invalid_document",
            "the PDF's page tree is damaged",
            id="count-too-high",
        ),
        pytest.param(
            "count-huge.pdf",
            lambda: lying_count_pdf(b"2147483647"),
            {},
            "invalid_document",
            "the PDF's page tree is damaged",
            id="count-huge",
        ),
        pytest.param(
            "count-fraction.pdf",  # MuPDF reads /Count 1.5 as two pages; the second does not exist
            lambda: lying_count_pdf(b"1.5"),
            {},
            "invalid_document",
            "page 2 cannot be read: the PDF says it has 2 pages, but its page tree is damaged",
            id="count-fraction",
        ),
        pytest.param(
            "damaged.pdf",
            lambda: damaged_pdf(32),
            {"render_page_seconds": 0.5},
            "render_timeout",
            "the document took longer than 0.5 s to open and check (APP_RENDER_PAGE_SECONDS)",
            id="damaged-32-mib",
        ),
    ],
)
def test_hostile_uploads_are_refused_quickly_and_leave_nothing_behind(
    make_server,
    name: str,
    build: Callable[[], bytes],
    settings: dict[str, float],
    code: str,
    message: str,
) -> None:
    server = make_server(**settings)
    data = build()
    with Responsiveness(server, "/healthz", "/v1/tasks?limit=1") as watch:
        time.sleep(0.2)  # a few reads before, for a baseline
        started = time.monotonic()
        refused = upload(server.client, data, name)
        seconds = time.monotonic() - started
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == code
    assert message in refused.json()["error"]["message"]
    assert seconds < 5
    watch.assert_responsive(min_reads=3)
    assert server.spool_files() == []
    assert server.task_dirs() == []
