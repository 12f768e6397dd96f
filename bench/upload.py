"""Memory and speed of a large upload: the service against the bare multipart library.

A PDF of ``--mb`` MB (pages of incompressible noise images, so the size is real) and a damaged copy
of it (the cross-reference table and trailer cut off, so PyMuPDF must repair it) are each sent as
a streamed multipart body to:

- the service, ``python -m app`` in its own process (``POST /v1/tasks/upload``, up to its 202);
- the baseline, a bare ASGI app under the same uvicorn that feeds the body to python-multipart's
  ``MultipartParser`` and writes the file part to disk: the least any multipart receiver does.

The RSS of each server process (and, for the service, its render processes) is sampled every
10 ms from before the request until its answer; the table shows the growth over the idle RSS and
MB/s, beside the baseline's.

    python bench/upload.py              # 150 MB, twice each
    python bench/upload.py --mb 60 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil
import pymupdf

from tests.servers import LoopbackProcess, ProcessServer

BOUNDARY = "benchboundary7d1f0c"
CHUNK = 1 << 20


def bare_app() -> object:
    """The baseline: an ASGI app that streams a multipart body through python-multipart to a file."""
    from python_multipart.multipart import MultipartParser

    async def app(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/healthz":
            await _answer(send, 200)
            return
        # Blocking writes on the loop, on purpose: one request at a time, the least work there is.
        with open(os.environ["BARE_DEST"], "wb") as out:  # noqa: ASYNC230
            parser = MultipartParser(
                BOUNDARY.encode(), {"on_part_data": lambda data, start, end: out.write(data[start:end])}
            )
            more = True
            while more:
                event = await receive()
                parser.write(event.get("body", b""))
                more = event.get("more_body", False)
        await _answer(send, 202)

    return app


async def _answer(send, status: int) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def make_documents(work: Path, mb: int) -> tuple[Path, Path]:
    """A valid PDF of about ``mb`` MB and a damaged copy (its last 2 % cut off: no xref, no trailer)."""
    side = 1200  # px: a noise image of 4.1 MiB that deflate cannot shrink
    doc = pymupdf.open()
    for number in range(max(1, mb * 2**20 // (side * side * 3))):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 72), f"Page {number + 1}", fontsize=20)
        noise = pymupdf.Pixmap(pymupdf.csRGB, side, side, os.urandom(side * side * 3), False)
        page.insert_image(page.rect, pixmap=noise)
    valid = work / "valid.pdf"
    doc.save(valid)
    doc.close()
    data = valid.read_bytes()
    damaged = work / "damaged.pdf"
    damaged.write_bytes(data[: len(data) * 98 // 100])
    return valid, damaged


def multipart_body(document: Path) -> Iterator[bytes]:
    """The body of a form with one ``file`` part, read from disk a chunk at a time."""
    yield (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{document.name}"\r\n'
        "Content-Type: application/pdf\r\n\r\n"
    ).encode()
    with document.open("rb") as source:
        while chunk := source.read(CHUNK):
            yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass(frozen=True)
class Upload:
    status: int
    rss_growth_mb: float  # of the server process
    children_growth_mb: float  # of its child processes together (peak against idle)
    seconds: float
    size_mb: float

    @property
    def mb_per_second(self) -> float:
        return self.size_mb / self.seconds


def rss(process: psutil.Process) -> tuple[int, int]:
    """The RSS of ``process`` itself and the sum of its children's (the render processes)."""
    main = process.memory_info().rss
    children = 0
    for member in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a render process ended meanwhile
            children += member.memory_info().rss
    return main, children


def upload(url: str, document: Path, pid: int) -> Upload:
    process = psutil.Process(pid)
    before = rss(process)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            now = rss(process)
            peak = (max(peak[0], now[0]), max(peak[1], now[1]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        response = httpx.post(
            url,
            content=multipart_body(document),
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            timeout=300,
        )
    finally:
        seconds = time.perf_counter() - started
        time.sleep(0.2)  # what the answer left behind counts too
        done.set()
        sampler.join()
    return Upload(
        response.status_code,
        (peak[0] - before[0]) / 2**20,
        (peak[1] - before[1]) / 2**20,
        seconds,
        document.stat().st_size / 2**20,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=150)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        import uvicorn

        uvicorn.run(bare_app(), host="127.0.0.1", port=int(os.environ["BARE_PORT"]), log_level="warning")  # type: ignore[arg-type]
        return

    rows: list[tuple[str, Upload]] = []
    with tempfile.TemporaryDirectory(prefix="dsocr-bench-") as tmp:
        work = Path(tmp)
        valid, damaged = make_documents(work, args.mb)
        bare = LoopbackProcess(work / "bare.log")
        bare.spawn(
            [sys.executable, __file__, "--bare"],
            {**os.environ, "BARE_PORT": str(bare.port), "BARE_DEST": str(work / "bare.out")},
        )
        service = ProcessServer(
            {
                "APP_DATA_DIR": str(work / "data"),
                "APP_MAX_UPLOAD_MB": str(args.mb + 50),
                # The task fails at once (no engine answers there): only the upload is measured.
                "APP_BACKEND": "vllm",
                "APP_VLLM_URL": "http://127.0.0.1:9",
                "APP_LOG_LEVEL": "warning",
            },
            work / "service.log",
        )
        try:
            bare.wait_ready("/healthz", 60)
            service.start()
            assert bare.process is not None
            assert service.process is not None
            for n in range(1, args.repeat + 1):
                for document in (valid, damaged):
                    rows.append(
                        (
                            f"bare python-multipart, {document.stem} #{n}",
                            upload(f"{bare.url}/upload", document, bare.process.pid),
                        )
                    )
                    rows.append(
                        (
                            f"service, {document.stem} #{n}",
                            upload(f"{service.url}/v1/tasks/upload", document, service.process.pid),
                        )
                    )
        finally:
            service.stop()
            bare.stop()
    print(f"\n{args.mb} MB PDF (valid, and damaged: its tail cut off), streamed; {os.cpu_count()} CPUs\n")
    print("| run | status | RSS growth MB | children's growth MB | MB/s | growth vs bare | MB/s vs bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base: Upload | None = None
    for name, run in rows:
        if name.startswith("bare"):
            base = run
        assert base is not None
        print(
            f"| {name} | {run.status} | {run.rss_growth_mb:.1f} | {run.children_growth_mb:.1f} | "
            f"{run.mb_per_second:.0f} | "
            f"{run.rss_growth_mb - base.rss_growth_mb:+.1f} MB | "
            f"{run.mb_per_second / base.mb_per_second:.2f}x |"
        )


if __name__ == "__main__":
    main()
