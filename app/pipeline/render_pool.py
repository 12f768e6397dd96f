"""Opening, checking and rendering documents in processes the service can kill.

A crafted PDF of a few kB (form XObjects nested a dozen deep, each drawing the next four times)
renders for hours, and PyMuPDF keeps the GIL while MuPDF works, so a thread would stall the event
loop with it: health checks, event streams and lease renewals would all stop. So every document
operation runs in a ``RenderPool`` process (``app.pipeline.render_child``) with a wall-clock
deadline per request and an address-space ceiling of its own. A request past its deadline, a page
past the ceiling, a crash or a cancel kills that process; the pool starts another in its place,
and the caller gets an error in ``app.errors`` naming the page (``RenderTimeout``,
``RenderMemoryExceeded``, ``DocumentTooComplex``).

Each process is a fresh interpreter (``asyncio.create_subprocess_exec``, the same as
multiprocessing's "spawn"): forking a service that holds torch and its threads is unsafe. Its pipes
are read by the event loop itself, so no thread waits on a render. A page comes back losslessly
encoded (``app.lossless``), by the process (the engine is sent it; previews are made from it; the
service decodes it only where it needs the pixels), and its text layer, in a shared memory file (a
memfd) that each process writes and the service maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from app import lossless, malloc
from app.documents import DocumentKind
from app.errors import (
    DocumentTooComplex,
    DsocrError,
    InvalidDocument,
    InvalidOptions,
    PageFailed,
    RenderMemoryExceeded,
    RenderTimeout,
    ServiceUnavailable,
    TooManyPages,
)
from app.pipeline.pages import TEXT_LAYER_MAX_CHARS, Inspection, PageImage
from app.pipeline.render_child import LENGTH, MAX_HEADER_BYTES

log = logging.getLogger(__name__)

# What a render process may refuse a request with; anything else it says is a broken process.
_REFUSALS: dict[str, type[DsocrError]] = {
    cls.__name__: cls for cls in (InvalidDocument, InvalidOptions, TooManyPages, RenderMemoryExceeded)
}
_START_SECONDS = 60.0  # s, for a new process to import its libraries and say it is ready
_PAGE_BUFFER_BYTES = 256 << 10
# A page of noise encodes a little larger than its pixels, plus the format's header and tags;
# past this it is a broken process, not a page.
_MAX_ENCODED_FACTOR = 2
_MAX_ENCODED_OVERHEAD = 64 << 10
_MAX_TEXT_BYTES = 4 * TEXT_LAYER_MAX_CHARS  # UTF-8 takes at most 4 bytes a character
_RESPAWN_BACKOFF_SECONDS = (1.0, 30.0)  # s, between failed starts of a replacement: first, most
# The package root, for the child's import path: the service may run from any directory.
_ROOT = Path(__file__).resolve().parents[2]


class _Died(Exception):
    """The process stopped (no message), or answered something that is not the protocol."""


class _Process:
    """One render process, its pipes and its shared pixel file; used by one request at a time."""

    def __init__(self, process: asyncio.subprocess.Process, pixels: int) -> None:
        self._process = process
        self._pixels = pixels  # the shared file's descriptor; -1 once closed
        self.document: Path | None = None  # the document its last render kept open, if any

    @classmethod
    async def start(cls, memory_mb: int) -> _Process:
        """Start a process and wait until it is ready. Raises ``ServiceUnavailable`` if it is not."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        pixels = _shared_file()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "app.pipeline.render_child",
                str(memory_mb),
                str(os.getpid()),
                str(pixels),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                pass_fds=(pixels,),
            )
        except OSError as exc:
            os.close(pixels)
            raise ServiceUnavailable(f"a render process cannot be started: {exc}") from exc
        started = cls(process, pixels)
        try:
            async with asyncio.timeout(_START_SECONDS):
                ready = await started._receive()
            if ready != {"ready": True}:
                raise _Died(f"it said {ready!r} instead of being ready")
        except (TimeoutError, _Died) as exc:
            started.kill()
            await started.wait()
            reason = (str(exc) or started.how_it_ended()) if isinstance(exc, _Died) else "it timed out"
            raise ServiceUnavailable(f"a render process did not start: {reason}") from exc
        except BaseException:  # cancelled
            started.kill()
            await started.wait()
            raise
        return started

    async def call(self, request: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Send ``request`` and return the answer within ``seconds``.

        Raises ``TimeoutError`` past the deadline and ``_Died`` when the process stops or breaks
        the protocol; the caller then kills it, as it does when this is cancelled.
        """
        assert self._process.stdin is not None
        body = json.dumps(request).encode()
        async with asyncio.timeout(seconds):
            try:
                self._process.stdin.write(LENGTH.pack(len(body)) + body)
                await self._process.stdin.drain()
            except ConnectionError as exc:
                raise _Died("its input is closed") from exc
            return await self._receive()

    async def _receive(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        try:
            (length,) = LENGTH.unpack(await self._process.stdout.readexactly(LENGTH.size))
            if length > MAX_HEADER_BYTES:
                raise _Died(f"it sent a frame of {length} bytes")
            answer = json.loads(await self._process.stdout.readexactly(length))
        except asyncio.IncompleteReadError as exc:
            raise _Died from exc  # it stopped: the caller reaps it to say how
        except ValueError as exc:  # not JSON
            raise _Died(f"it sent garbage: {exc}") from exc
        if not isinstance(answer, dict):
            raise _Died("it sent something other than an object")
        return answer

    def read_page(
        self, encoded: int, text: int, size: tuple[int, int], max_pixels: int
    ) -> tuple[lossless.Encoded, str]:
        """The page's ``encoded`` bytes (``app.lossless``) and ``text`` bytes of its text layer the
        last render left in the shared file (blocking: a copy of a few hundred kB, and the image's
        header read). Raises ``ValueError`` when the file holds fewer, or an image that is not
        what ``lossless.encode`` makes of ``size`` pixels."""
        with (
            mmap.mmap(self._pixels, encoded + text, access=mmap.ACCESS_READ) as shared,
            memoryview(shared) as view,
        ):
            data = bytes(view[:encoded])
            # A broken process's bytes must not fail the page: "replace" keeps them harmless.
            layer = str(view[encoded:], "utf-8", "replace")
        # Checked here, off the event loop: a crafted image may make its header slow to read.
        if lossless.declared_size(data, max_pixels) != size:
            raise ValueError(f"its image is not of the {size[0]}x{size[1]} pixels it said")
        return lossless.Encoded(size, data), layer

    def how_it_ended(self) -> str:
        """How a reaped process ended, e.g. "killed by SIGSEGV"."""
        code = self._process.returncode
        if code is None:
            return "it is still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def kill(self) -> None:
        """Kill the process now (it may be in the middle of a render); ``wait`` reaps it."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    async def wait(self) -> None:
        """Wait for the process to end (``kill`` it first), then close the shared file."""
        try:
            await self._process.wait()
        finally:  # even when cancelled: the file is of no use once the process is killed
            if self._pixels >= 0:
                os.close(self._pixels)
                self._pixels = -1


def _give_back_page_buffers() -> None:
    """Have glibc's malloc return every block of 256 KiB or more to the system when it is freed.

    Here, the service's process, a page is blocks of hundreds of kB (its encoding, the base64 and
    JSON of its request to the engine) and of megabytes when decoded (crops, engines in this
    process). With glibc's own thresholds those blocks come out of its heaps, which fragment: the
    service's RSS crept up with the number of pages (227 MiB after 200 pages, 278 MiB after 1,000,
    in ``bench/ceiling.py``). With 1 MiB, 190 and 209 MiB (16 pages in flight, each page judged
    and cropped in a thread of its own); with 256 KiB, 175 and 187 MiB, for 2-3 ms of CPU a page.
    The render processes, where every page is pixels, keep theirs (``render_child``).
    """
    malloc.set_thresholds(mmap_bytes=_PAGE_BUFFER_BYTES)


def _shared_file() -> int:
    """A file in memory for a process's pixels: a memfd, or an unlinked temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("dsocr-render-pixels")  # close-on-exec; pass_fds lets the child have it
    with tempfile.TemporaryFile() as file:
        return os.dup(file.fileno())


class RenderPool:
    """A few render processes shared by submit-time checks and tasks, with limits per request.

    ``start`` before use and ``close`` when done (or ``async with``). Requests wait for a free
    process; each then has ``page_seconds`` of wall-clock time, and each process ``memory_mb`` MiB
    of address space. A render goes preferably to the process that rendered the same document
    last, which keeps it open (a damaged PDF is repaired once per task, not once per page).
    """

    def __init__(self, *, processes: int, page_seconds: float, memory_mb: int) -> None:
        self._size = processes
        self._page_seconds = page_seconds
        self._memory_mb = memory_mb
        self._idle: list[_Process] = []
        self._busy: set[_Process] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._replacing: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False

    @property
    def processes(self) -> int:
        """How many processes the pool runs: how many renders can run at once."""
        return self._size

    async def start(self) -> None:
        """Start the processes. Raises ``ServiceUnavailable`` when one cannot start."""
        _give_back_page_buffers()
        results = await asyncio.gather(
            *(_Process.start(self._memory_mb) for _ in range(self._size)), return_exceptions=True
        )
        started = [result for result in results if isinstance(result, _Process)]
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            for process in started:
                process.kill()
                await process.wait()
            raise failures[0]
        self._idle.extend(started)
        self._started = True

    async def close(self) -> None:
        """Kill every process, the busy ones too; requests still waiting get ``ServiceUnavailable``."""
        self._closed = True
        for task in self._replacing:
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        processes = [*self._idle, *self._busy]
        self._idle.clear()
        for process in processes:
            process.kill()
        for process in processes:
            await process.wait()
        self._wake()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def inspect(
        self, path: Path, kind: DocumentKind, spec: str | None, *, max_pages: int, max_pixels: int
    ) -> Inspection:
        """``app.pipeline.pages.inspect_document`` in a render process: count the pages of a
        document and select them by ``spec``. Raises what it raises, and ``RenderTimeout`` or
        ``RenderMemoryExceeded`` when the document passes a limit."""
        request = {
            "op": "inspect",
            "path": os.fspath(path),  # a relative path resolves alike: the processes share our cwd
            "kind": kind.value,
            "spec": spec,
            "max_pages": max_pages,
            "max_pixels": max_pixels,
        }
        process, answer = await self._call(
            request, subject="the document", doing="open and check", document=None
        )
        self._release(process)
        page_count, numbers = answer.get("page_count"), answer.get("numbers")
        if not isinstance(page_count, int) or not isinstance(numbers, list):
            raise PageFailed(f"a render process answered {answer!r} to a check")
        return Inspection(page_count, [int(number) for number in numbers])

    async def render(
        self, path: Path, kind: DocumentKind, number: int, *, dpi: float, max_pixels: int
    ) -> PageImage:
        """Render 1-based page ``number`` as ``app.pipeline.pages.Document.render`` does, in a
        render process, with its ``encoded`` form (``app.lossless``), ``text_layer`` and ``has_ink``
        made there too; the pixels come encoded alone, decoded when first used
        (``PageImage.image``). Raises what it raises, and ``RenderTimeout`` or ``RenderMemoryExceeded``
        naming the page when it passes a limit. Cancelling this kills the render."""
        request = {
            "op": "render",
            "path": os.fspath(path),  # a relative path resolves alike: the processes share our cwd
            "kind": kind.value,
            "number": number,
            "dpi": dpi,
            "max_pixels": max_pixels,
        }
        process, answer = await self._call(request, subject=f"page {number}", doing="render", document=path)
        try:
            width, height, page_dpi = answer.get("width"), answer.get("height"), answer.get("dpi")
            length, text, ink = answer.get("encoded"), answer.get("text"), answer.get("has_ink")
            if not (
                isinstance(width, int)
                and isinstance(height, int)
                and width > 0
                and height > 0
                and width * height <= max_pixels
                and (page_dpi is None or isinstance(page_dpi, int | float))
                and isinstance(length, int)
                and 0 < length <= _MAX_ENCODED_FACTOR * 3 * width * height + _MAX_ENCODED_OVERHEAD
                and (text is None or (isinstance(text, int) and 0 < text <= _MAX_TEXT_BYTES))
                and isinstance(ink, bool)
            ):
                raise ValueError(f"it answered {answer!r}")
            encoded, layer = await asyncio.to_thread(
                process.read_page, length, text or 0, (width, height), max_pixels
            )
        except ValueError as exc:  # the shared file holds less than it said, or not an encoded page
            self._replace(process)
            raise PageFailed(f"page {number}: a render process broke the protocol: {exc}") from None
        except BaseException:
            self._replace(process)
            raise
        self._release(process)
        return PageImage(
            number=number,
            dpi=None if page_dpi is None else float(page_dpi),
            encoded=encoded,
            text_layer=None if text is None else layer,
            has_ink=ink,
        )

    async def _call(
        self, request: dict[str, Any], *, subject: str, doing: str, document: Path | None
    ) -> tuple[_Process, dict[str, Any]]:
        """Run one request on a free process; return it, still held, with its answer: the caller
        releases it (``_release``), or replaces it if it did not behave. Translates refusals."""
        process = await self._acquire(document)
        try:
            answer = await process.call(request, self._page_seconds)
        except TimeoutError:
            self._replace(process)
            raise RenderTimeout(
                f"{subject} took longer than {self._page_seconds:g} s to {doing} (APP_RENDER_PAGE_SECONDS): "
                "the document is too complex, or crafted to be"
            ) from None
        except _Died as exc:
            self._replace(process)
            if self._closed:
                raise ServiceUnavailable("the service is stopping") from None
            await process.wait()  # to say how it ended
            reason = str(exc) or process.how_it_ended()
            log.warning("a render process stopped on %s: %s", subject, reason)
            raise DocumentTooComplex(
                f"{subject} stopped the process that was to {doing} it ({reason}); it may need more than "
                f"the {self._memory_mb} MiB a render process may use (APP_RENDER_MEMORY_MB)"
            ) from None
        except BaseException:  # cancelled: the page may be in the middle of its render
            self._replace(process)
            raise
        if answer.get("ok") is True:
            process.document = document
            return process, answer
        error = _REFUSALS.get(str(answer.get("error")))
        message = answer.get("message")
        if error is None or not isinstance(message, str):
            self._replace(process)
            raise PageFailed(f"{subject}: a render process answered {answer!r}")
        if error is RenderMemoryExceeded:
            # Its heap may be left near the ceiling, or fragmented: a fresh process takes its place.
            self._replace(process)
            raise error(f"{message} ({self._memory_mb} MiB: APP_RENDER_MEMORY_MB)")
        process.document = None
        self._release(process)
        raise error(message)

    async def _acquire(self, document: Path | None) -> _Process:
        """Take a free process, preferring the one that has ``document`` open."""
        while not self._idle:
            if self._closed or not self._started:
                raise ServiceUnavailable("the render processes are not running")
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        same = [process for process in self._idle if document is not None and process.document == document]
        free = [process for process in self._idle if process.document is None]
        process = (same or free or self._idle)[0]
        self._idle.remove(process)
        self._busy.add(process)
        return process

    def _release(self, process: _Process) -> None:
        self._busy.discard(process)
        if self._closed:
            process.kill()
            return
        self._idle.append(process)
        self._wake()

    def _wake(self) -> None:
        # Every waiter looks again: one that was cancelled meanwhile must not swallow the wake-up.
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _replace(self, process: _Process) -> None:
        """Kill ``process`` now and start another in its place, in the background."""
        process.kill()
        self._busy.discard(process)
        if self._closed:
            return
        task = asyncio.create_task(self._respawn(process), name="dsocr-render-respawn")
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _respawn(self, dead: _Process) -> None:
        await dead.wait()
        backoff = _RESPAWN_BACKOFF_SECONDS[0]
        while True:
            try:
                process = await _Process.start(self._memory_mb)
            except ServiceUnavailable as exc:
                log.error("%s; trying again in %.0f s", exc.message, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, _RESPAWN_BACKOFF_SECONDS[1])
                continue
            if self._closed:
                process.kill()
                await process.wait()
                return
            self._idle.append(process)
            self._wake()
            return
