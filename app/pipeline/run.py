"""One task's pages end to end: render, recognise, parse, assemble, store.

The event loop only awaits here: pages render in the ``RenderPool``'s processes, as many at once as
it has and ahead of recognition, each under its deadline (a cancel or a shutdown seen while pages
render kills those renders); each render process also encodes its page losslessly
(``app.lossless``) as the engine is sent it and the preview is made from it, so the service's own
process only stores it, as soon as it arrives. Assembly and file writes run in threads, inference
goes through the ``ModelManager``. Pages are
recognised in *calls* shaped by the engine (``ModelManager.limits``): batches one at a time for
the ``hf`` engine, single pages many at once for the ``vllm`` engine. Calls run as asyncio tasks
while the next pages render, so rendering overlaps recognition; at most ``2 * calls_in_flight``
calls are held (running, or done and waiting for an earlier page), which bounds the rendered pages
kept in memory. Results are assembled strictly in page order, so progress moves page by page and
``full.md`` is in order whatever order the server answers in; but the work of a page's first
attempt (parsing, judging, and when no retry can follow, cropping its figures and storing them) is
done as soon as its call ends, by a task of its own (the call's place in flight is free by then),
so pages are judged and cropped side by side and the in-order part only appends each to the
results. An assembled page goes to disk
(``AssembledPages``) once stored, so memory does not grow with the document.

A page's raw output is stored as soon as it exists, even ahead of earlier pages, so a task resumed
after a restart re-renders its pages but recognises only those without a raw file.

The retry ladder (issue 17): each attempt at a page is judged (``quality.assess``); a suspect page
is recognised again, rung by rung (``PageJob.retries``, from ``app.tasks.options.ladder``), up to
``PageJob.max_retries`` times, climbing only to rungs that remedy what the best attempt so far is
suspect of, until an attempt is not suspect; the best attempt by ``PageQuality.rank`` is kept
(the earlier of equals). A page's retries run when it is next to be assembled, in page order, so a
retry never runs ahead of the first attempts of later pages: it is sent after those already sent
(the ``hf`` engine runs calls one at a time, in the order they come) and no new first attempt is
sent while it runs. Every attempt's raw output is stored (``raw/pNNNN.rK.json`` for rung ``K``) as
soon as it exists, and a resumed task reads back the rungs it finds instead of running them again.
A page's seconds are those of all its attempts.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from app import lossless
from app.documents import DocumentKind
from app.engines.base import PageText, RecognizeOptions
from app.engines.manager import DispatchLimits, ModelManager
from app.errors import DsocrError, PageFailed
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage, assemble_page
from app.pipeline.grounding import ParsedPage, parse_page
from app.pipeline.outputs import AssembledPages
from app.pipeline.pages import PageImage
from app.pipeline.quality import PageQuality, assess
from app.pipeline.render_pool import RenderPool
from app.storage.base import TaskStore

OnPage = Callable[[AssembledPage, float], Awaitable[None]]
"""Called after each page with the assembled page and the seconds it took."""


# Pages assembled at once, each holding its decoded pixels (6-8 MB) while its figures are cut:
# more than the cores would only raise the peak memory, not the pace.
_CUTTING = threading.BoundedSemaphore(os.cpu_count() or 1)
_FAILURE_GRACE_SECONDS = 1.0  # how long a failure waits for the calls sent before it
_INTERRUPT_POLL_SECONDS = 0.1  # how often a page's render looks for a cancel or a shutdown
# A pipeline built without a pool (tools, benchmarks) renders trusted documents: it starts one
# process per run, with limits that only a broken file reaches.
_OWN_POOL_PAGE_SECONDS = 600.0
_OWN_POOL_MEMORY_MB = 8192


@dataclass(frozen=True)
class Rung:
    """One rung of the retry ladder: what the engine is asked, and the reasons it may cure (the
    names of ``app.pipeline.quality.REASONS``)."""

    options: RecognizeOptions
    remedies: frozenset[str]


@dataclass(frozen=True)
class PageJob:
    """Everything the pipeline needs to know about one task; no HTTP, no task record."""

    task_id: str
    input_path: Path
    kind: DocumentKind
    page_numbers: Sequence[int]
    dpi: float
    max_pixels: int
    batch_size: int  # the most pages per call to a batch engine (also capped by the engine)
    recognize: RecognizeOptions
    lease: int = 0  # the worker's lease on the task: results are written under it (app.storage.base)
    retries: Sequence[Rung] = ()  # the ladder's rungs 1, 2, ... (rung 0 is ``recognize``)
    max_retries: int = 0  # APP_PAGE_RETRIES: the most rungs one page climbs (0: no retries)
    min_agreement: float = 0.5  # APP_QUALITY_MIN_AGREEMENT, below which a page is suspect


@dataclass(frozen=True)
class _Attempt:
    """One attempt at a page, judged."""

    rung: int
    text: PageText
    parsed: ParsedPage
    quality: PageQuality


@dataclass(frozen=True)
class _Ready:
    """A page's first attempt as its call ended: where its in-order assembly starts from."""

    text: PageText
    seconds: float  # recognising it; 0 for a page read back from raw/
    first: _Attempt | None = None  # judged, unless read back from raw/ (judged when assembled)
    # When that attempt is final (no rung would follow it): the page assembled, its crops stored.
    assembled: AssembledPage | None = None


@dataclass(frozen=True)
class _Call:
    """Consecutive pages recognised together, and the asyncio tasks that recognise them and make
    each page ready: the call holds its place among those in flight only while it recognises."""

    pages: list[PageImage]
    recognition: asyncio.Future[Any]  # done once the engine answered and the raw files are stored
    result: asyncio.Future[list[_Ready]]  # each page's first attempt, judged (and assembled)


class PagePipeline:
    """Runs ``PageJob``s against a store and a shared model, rendering in ``renders`` (``None``:
    a pool of one process started for each run and closed at its end)."""

    def __init__(
        self,
        *,
        store: TaskStore,
        models: ModelManager,
        metrics: Metrics,
        renders: RenderPool | None = None,
    ) -> None:
        self._store = store
        self._models = models
        self._metrics = metrics
        self._renders = renders

    async def run(
        self, job: PageJob, *, on_page: OnPage, check_interrupt: Callable[[], None]
    ) -> AssembledPages:
        """Process every page and return them assembled, in order, spooled to disk (the caller
        closes what it gets).

        ``check_interrupt`` is called before each page is rendered, while it renders and before
        each page is assembled; what it raises (cancel, shutdown) stops the task, and the renders
        and the calls still running are cancelled. A failed call fails the task as soon as it
        fails, with its page(s) named, as does a page that cannot be rendered. Figures are stored
        as each page is assembled; nothing of a page stays in memory once it is stored.
        """
        if self._renders is not None:
            return await self._run(job, self._renders, on_page, check_interrupt)
        async with RenderPool(
            processes=1, page_seconds=_OWN_POOL_PAGE_SECONDS, memory_mb=_OWN_POOL_MEMORY_MB
        ) as renders:
            return await self._run(job, renders, on_page, check_interrupt)

    async def _run(
        self, job: PageJob, renders: RenderPool, on_page: OnPage, check_interrupt: Callable[[], None]
    ) -> AssembledPages:
        done = AssembledPages()
        try:
            await self._run_pages(job, renders, done, on_page, check_interrupt)
        except BaseException:
            done.close()
            raise
        return done

    async def _run_pages(
        self,
        job: PageJob,
        renders: RenderPool,
        done: AssembledPages,
        on_page: OnPage,
        check_interrupt: Callable[[], None],
    ) -> None:
        held: deque[_Call] = deque()  # in page order
        batch: list[PageImage] = []  # rendered, not yet sent
        limits: DispatchLimits | None = None
        ahead = _RenderAhead(renders, job, functools.partial(self._store_page, job), check_interrupt)
        positions = {number: index for index, number in enumerate(job.page_numbers)}
        # Handed to the engine when the call before it was: the model manager runs calls in the
        # order they reach it, and their pixels decode in threads that may end in any order.
        handed_over: asyncio.Future[None] | None = None

        async def send(room_for: DispatchLimits) -> None:
            nonlocal handed_over
            await self._make_room(job, held, room_for.calls_in_flight, done, on_page, check_interrupt)
            previous, handed_over = handed_over, asyncio.get_running_loop().create_future()
            pages = list(batch)
            batch.clear()
            call = asyncio.ensure_future(self._recognize(job, pages, room_for, previous, handed_over))
            call.add_done_callback(functools.partial(_pass_on, handed_over))  # even if it never ran
            ready = asyncio.ensure_future(self._make_ready(job, pages, call, positions))
            held.append(_Call(pages, call, ready))

        try:
            async with self._models.hold():
                for _ in job.page_numbers:
                    check_interrupt()
                    await self._assemble_ready(job, held, done, on_page, check_interrupt)
                    page, saved = await ahead.next()
                    if saved is not None:
                        if batch:  # keep page order: the pages before this one go first
                            assert limits is not None
                            await send(limits)
                        text = _saved_text(saved)
                        read_back = _resolved([_Ready(text, 0.0)])
                        held.append(_Call([page], read_back, read_back))
                        continue
                    if limits is None:
                        limits = await self._limits(page)
                    batch.append(page)
                    if len(batch) >= min(job.batch_size, limits.pages_per_call):
                        await send(limits)
                if batch:
                    assert limits is not None
                    await send(limits)
                while held:
                    await self._wait(held)
                    await self._assemble_ready(job, held, done, on_page, check_interrupt)
        finally:
            await ahead.cancel()
            await _cancel(held)

    async def _limits(self, page: PageImage) -> DispatchLimits:
        """The engine's limits; loading it is the first page's work, so its failure names that page."""
        try:
            return await self._models.limits()
        except DsocrError as exc:
            exc.message = f"page {page.number}: {exc.message}"
            raise

    async def _make_room(
        self,
        job: PageJob,
        held: deque[_Call],
        calls_in_flight: int,
        done: AssembledPages,
        on_page: OnPage,
        check_interrupt: Callable[[], None],
    ) -> None:
        """Wait until another call may start: fewer than ``calls_in_flight`` running and fewer
        than twice that held, assembling pages as they become ready."""
        while True:
            await self._assemble_ready(job, held, done, on_page, check_interrupt)
            running = sum(1 for call in held if not call.recognition.done())
            if running < calls_in_flight and len(held) < 2 * calls_in_flight:
                return
            await self._wait(held)

    @staticmethod
    async def _wait(held: deque[_Call]) -> None:
        """Wait until one of the held calls ends its recognition, or has its pages ready."""
        pending = [future for call in held for future in (call.recognition, call.result) if not future.done()]
        if pending:
            await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)

    async def _assemble_ready(
        self,
        job: PageJob,
        held: deque[_Call],
        done: AssembledPages,
        on_page: OnPage,
        check_interrupt: Callable[[], None],
    ) -> None:
        """Assemble the pages of the leading calls that are done, in order.

        A call that failed fails the task at once, even behind calls still running: waiting for
        them would only delay an error that is already certain. Only the calls before it get a
        moment (``_FAILURE_GRACE_SECONDS``) to end, so that pages sent together and failing alike
        (a context too small for any page) name the first of them; the pages of those that ended
        well are stored first, so the task's progress counts every page recognised before it.
        """
        for n, call in enumerate(held):
            if _failed(call):
                earlier = [c.result for c in list(held)[:n] if not c.result.done()]
                if earlier:
                    await asyncio.wait(earlier, timeout=_FAILURE_GRACE_SECONDS)
                await self._assemble_done(job, held, done, on_page, check_interrupt)
                for failed in held:
                    if _failed(failed):
                        failed.result.result()  # raises the failure, which names its page(s)
        await self._assemble_done(job, held, done, on_page, check_interrupt)

    async def _assemble_done(
        self,
        job: PageJob,
        held: deque[_Call],
        done: AssembledPages,
        on_page: OnPage,
        check_interrupt: Callable[[], None],
    ) -> None:
        """Assemble the pages of the leading calls that ended well, in order."""
        while held and held[0].result.done() and not _failed(held[0]):
            call = held.popleft()
            for page, ready in zip(call.pages, call.result.result(), strict=True):
                check_interrupt()
                await self._finish_page(job, page, ready, done, on_page, check_interrupt)

    async def _recognize(
        self,
        job: PageJob,
        batch: list[PageImage],
        limits: DispatchLimits,
        previous: asyncio.Future[None] | None,
        handed_over: asyncio.Future[None],
    ) -> list[tuple[PageText, float]]:
        """Recognise one call's pages and store each page's raw output at once; each page's text
        and seconds. The call is handed to the engine once ``previous`` (the call before it) was;
        ``handed_over`` says it was."""
        try:
            images = await _for_engine(batch, limits)
            if previous is not None:
                await asyncio.shield(previous)
            recognition = asyncio.ensure_future(self._models.recognize(images, job.recognize))
        finally:
            _pass_on(handed_over)
        started = time.perf_counter()
        try:
            texts = await recognition
        except DsocrError as exc:
            if len(batch) == 1:
                exc.message = f"page {batch[0].number}: {exc.message}"
            else:
                exc.message = f"pages {batch[0].number}-{batch[-1].number}: {exc.message}"
            raise
        seconds = (time.perf_counter() - started) / len(batch)

        def write_raw() -> None:  # one thread for the call's pages: each hop waits for the GIL
            for page, text in zip(batch, texts, strict=True):
                payload = _raw_payload(page, text, seconds, 0, job.recognize)
                self._store.write_raw(job.task_id, page.number, payload)

        await asyncio.to_thread(write_raw)
        return [(text, seconds) for text in texts]

    async def _make_ready(
        self,
        job: PageJob,
        pages: list[PageImage],
        recognition: asyncio.Future[list[tuple[PageText, float]]],
        positions: dict[int, int],
    ) -> list[_Ready]:
        """Once the call's ``recognition`` ends, judge each page's first attempt and assemble
        those whose attempt is final (``_prepare``; ``positions``: each page number's index in the
        task's result), outside the call's place in flight: the next call is already on its way."""
        recognized = await recognition

        def prepare() -> list[_Ready]:  # one thread for the call's pages, as above
            return [
                self._prepare(job, page, text, seconds, positions[page.number])
                for page, (text, seconds) in zip(pages, recognized, strict=True)
            ]

        return await asyncio.to_thread(prepare)

    def _prepare(self, job: PageJob, page: PageImage, text: PageText, seconds: float, index: int) -> _Ready:
        """Judge a page's first attempt and, when no rung would follow it, assemble the page at
        ``index`` and store its crops (blocking)."""
        first = self._judged(page, 0, text, job.min_agreement)
        if not _is_final(job, first):
            return _Ready(text, seconds, first)
        return _Ready(text, seconds, first, self._assembled(job, page, first, 1, index))

    def _store_page(self, job: PageJob, page: PageImage) -> dict[str, Any] | None:
        """Store the rendered page (its preview's source) and return its first attempt's raw
        output from an earlier run, if any (blocking)."""
        self._store.write_preview(job.task_id, page.number, page.encoded_data())
        return self._store.read_raw(job.task_id, page.number)

    async def _climb(
        self, job: PageJob, page: PageImage, first: _Attempt, check_interrupt: Callable[[], None]
    ) -> tuple[_Attempt, int, float]:
        """The page's best attempt, how many attempts it had and their seconds (0 for those read
        back from raw/), after climbing the ladder as far as the page needs (module docstring).

        A rung whose request the engine would make exactly as an earlier attempt's is passed over:
        decoding is greedy, so it would give the same answer (the ``vllm`` engines leave the image
        geometry to vLLM, so the resolution rung changes nothing they send).
        """
        best = first
        attempts, seconds = 1, 0.0
        sent = [job.recognize]
        for number, rung in enumerate(job.retries, start=1):
            if attempts > job.max_retries or not best.quality.suspect:
                break
            if not rung.remedies.intersection(best.quality.reasons):
                continue
            check_interrupt()
            saved = await asyncio.to_thread(self._store.read_raw, job.task_id, page.number, number)
            if saved is not None:
                text = _saved_text(saved)
            else:
                limits = await self._limits(page)
                if any(_same_request(rung.options, other, limits) for other in sent):
                    continue
                text, spent = await self._retry(job, page, number, rung.options)
                seconds += spent
            sent.append(rung.options)
            attempts += 1
            attempt = await asyncio.to_thread(self._judged, page, number, text, job.min_agreement)
            if attempt.quality.rank() > best.quality.rank():
                best = attempt
        return best, attempts, seconds

    async def _retry(
        self, job: PageJob, page: PageImage, number: int, options: RecognizeOptions
    ) -> tuple[PageText, float]:
        """Recognise ``page`` again with rung ``number``'s options and store the attempt at once."""
        images = await _for_engine([page], await self._limits(page))
        started = time.perf_counter()
        try:
            (text,) = await self._models.recognize(images, options)
        except DsocrError as exc:
            exc.message = f"page {page.number}, retry rung {number}: {exc.message}"
            raise
        seconds = time.perf_counter() - started
        payload = _raw_payload(page, text, seconds, number, options)
        await asyncio.to_thread(self._store.write_raw, job.task_id, page.number, payload, number)
        self._metrics.page_retries.inc()
        return text, seconds

    @staticmethod
    def _judged(page: PageImage, rung: int, text: PageText, min_agreement: float) -> _Attempt:
        """Parse one attempt and assess it (blocking: parsing a long page takes a while)."""
        try:
            parsed = parse_page(text.text, text.stop_reason)
            quality = assess(
                text, parsed, text_layer=page.text_layer, has_ink=page.has_ink, min_agreement=min_agreement
            )
        except Exception as exc:  # a parser bug must fail this task with the page named, not the worker
            raise PageFailed(f"page {page.number}: {type(exc).__name__}: {exc}") from exc
        return _Attempt(rung, text, parsed, quality)

    async def _finish_page(
        self,
        job: PageJob,
        page: PageImage,
        ready: _Ready,
        done: AssembledPages,
        on_page: OnPage,
        check_interrupt: Callable[[], None],
    ) -> None:
        """Append the page to ``done`` as the next one, assembled by its call if its first attempt
        was final, else after climbing the ladder (``_climb``) from it."""
        seconds = ready.seconds
        if ready.assembled is not None and ready.first is not None:
            kept, assembled = ready.first, ready.assembled
        else:
            first = ready.first
            if first is None:
                first = await asyncio.to_thread(self._judged, page, 0, ready.text, job.min_agreement)
            kept, attempts, retry_seconds = await self._climb(job, page, first, check_interrupt)
            seconds += retry_seconds
            assembled = await asyncio.to_thread(self._assembled, job, page, kept, attempts, len(done))
        # Calls assemble their pages at the index the page's number has in the selection: every
        # page before this one was appended, once, in order.
        assert assembled.index == len(done), (assembled.index, len(done))
        await asyncio.to_thread(done.add, assembled)
        self._metrics.observe_quality(kept.quality)
        if seconds:
            self._metrics.page_duration.observe(seconds)
            self._metrics.pages_processed.labels("truncated" if assembled.truncated else "complete").inc()
        await on_page(assembled, seconds)

    def _assembled(
        self, job: PageJob, page: PageImage, kept: _Attempt, attempts: int, index: int
    ) -> AssembledPage:
        """The page at ``index`` from its ``kept`` attempt of ``attempts``, its crops stored
        (blocking)."""
        quality = kept.quality.as_json(attempts=attempts, rung=kept.rung)
        try:
            with _CUTTING:
                assembled = assemble_page(page, kept.parsed, index, quality=quality)
                page.forget_pixels()
            for name, png in assembled.crops:
                self._store.write_image(job.task_id, name, png, lease=job.lease)
        except DsocrError:
            raise
        except Exception as exc:  # a crop bug must fail this task with the page named, not the worker
            raise PageFailed(f"page {page.number}: {type(exc).__name__}: {exc}") from exc
        return assembled

    def write_outputs(self, task_id: str, pages: AssembledPages, lease: int = 0) -> None:
        """Store ``full.md`` and ``layout.json`` under ``lease``, streamed from ``pages`` (blocking)."""
        self._store.write_result(task_id, "full.md", pages.markdown_chunks(), lease=lease)
        self._store.write_result(task_id, "layout.json", pages.layout_chunks(), lease=lease)


class _RenderAhead:
    """The job's pages rendered in order, as many at once as the pool has processes, ahead of the
    page being recognised: the next pages are ready by the time they are wanted."""

    def __init__(
        self,
        renders: RenderPool,
        job: PageJob,
        store: Callable[[PageImage], dict[str, Any] | None],
        check_interrupt: Callable[[], None],
    ) -> None:
        self._renders = renders
        self._job = job
        self._store = store  # blocking: keeps the page, and answers its raw output from earlier
        self._check_interrupt = check_interrupt
        self._numbers = iter(job.page_numbers)
        self._started: deque[asyncio.Future[tuple[PageImage, dict[str, Any] | None]]] = deque()

    async def next(self) -> tuple[PageImage, dict[str, Any] | None]:
        """The next page, stored, with what ``store`` answered for it, calling ``check_interrupt``
        while it renders: what it raises is raised here (``cancel`` then kills the renders).
        Raises what the render raises."""
        self._start_more()
        render = self._started[0]
        while not render.done():
            await asyncio.wait([render], timeout=_INTERRUPT_POLL_SECONDS)
            if not render.done():
                self._check_interrupt()
        self._started.popleft()
        self._start_more()  # every process busy while this page goes on its way
        return render.result()

    def _start_more(self) -> None:
        """Start renders until one more page than the pool has processes is running or ready (or
        no page is left): every process stays busy, and rendered pages kept waiting are bounded."""
        while len(self._started) <= max(1, self._renders.processes):
            number = next(self._numbers, None)
            if number is None:
                return
            self._started.append(asyncio.ensure_future(self._render_and_store(number)))

    async def _render_and_store(self, number: int) -> tuple[PageImage, dict[str, Any] | None]:
        job = self._job
        page = await self._renders.render(
            job.input_path, job.kind, number, dpi=job.dpi, max_pixels=job.max_pixels
        )
        return page, await asyncio.to_thread(self._store, page)

    async def cancel(self) -> None:
        """Cancel the renders still running (the pool kills their processes) and wait for them."""
        for render in self._started:
            render.cancel()
        # Their failures are moot once the task stopped, but must be retrieved.
        await asyncio.gather(*self._started, return_exceptions=True)
        self._started.clear()


def _pass_on(handed_over: asyncio.Future[None], *_: object) -> None:
    """Let the next call go to the engine (once; a done callback's argument is ignored)."""
    if not handed_over.done():
        handed_over.set_result(None)


async def _for_engine(pages: list[PageImage], limits: DispatchLimits) -> list[Image.Image]:
    """The pages' images as the engine takes them.

    An engine that sends the encoded page a render process made (``limits.sends_encoded``) gets
    it opened, not decoded: ``app.engines.vllm`` reads only its size and the bytes it carries
    (``lossless.held``). Any other gets the RGB pixels, decoded in a thread (about 10 ms a page).
    Raises ``PageFailed`` naming the page when it cannot be decoded (a broken render process).
    """
    if limits.sends_encoded and all(page.encoded is not None for page in pages):
        # Their headers were read when they arrived (``lossless.declared_size``): cheap, no thread.
        return [lossless.opened(page.encoded) for page in pages if page.encoded is not None]

    def decode() -> list[Image.Image]:
        images: list[Image.Image] = []
        for page in pages:
            try:
                images.append(page.image)
            except (OSError, ValueError) as exc:
                raise PageFailed(f"page {page.number}: its rendered image cannot be read: {exc}") from exc
        return images

    return await asyncio.to_thread(decode)


def _raw_payload(
    page: PageImage, text: PageText, seconds: float, rung: int, options: RecognizeOptions
) -> dict[str, Any]:
    """What ``raw/`` keeps of one attempt: the model's output verbatim, and the rung that asked."""
    return {
        "page": page.number,
        "text": text.text,
        "stop_reason": text.stop_reason,
        "tokens": text.tokens,
        "prompt_tokens": text.prompt_tokens,
        "seconds": round(seconds, 3),
        "rung": rung,
        "options": asdict(options),
    }


def _saved_text(saved: dict[str, Any]) -> PageText:
    """An attempt read back from ``raw/`` (files of earlier versions lack the newer counts)."""
    return PageText(
        saved["text"], saved["stop_reason"], saved.get("tokens", 0), saved.get("prompt_tokens", 0)
    )


def _same_request(options: RecognizeOptions, other: RecognizeOptions, limits: DispatchLimits) -> bool:
    """Whether the engine would send ``options`` exactly as ``other`` (the sizes count only where
    the engine applies them)."""
    if not limits.sizes_apply:
        other = replace(
            other, base_size=options.base_size, image_size=options.image_size, crop_mode=options.crop_mode
        )
    return options == other


def _failed(call: _Call) -> bool:
    """Whether the call ended with an error (a cancelled one is no failure of its own)."""
    return call.result.done() and not call.result.cancelled() and call.result.exception() is not None


def _is_final(job: PageJob, attempt: _Attempt) -> bool:
    """Whether no rung would follow ``attempt`` as a page's first (``_climb``)."""
    return (
        not attempt.quality.suspect
        or job.max_retries == 0
        or not any(rung.remedies.intersection(attempt.quality.reasons) for rung in job.retries)
    )


def _resolved(value: list[_Ready]) -> asyncio.Future[list[_Ready]]:
    future: asyncio.Future[list[_Ready]] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


async def _cancel(held: deque[_Call]) -> None:
    """Cancel the calls still running and wait for them, so none outlives its task."""
    for call in held:
        call.recognition.cancel()
        call.result.cancel()
    # return_exceptions: their failures are moot once the task stopped, but must be retrieved.
    await asyncio.gather(
        *(future for call in held for future in (call.recognition, call.result)), return_exceptions=True
    )
