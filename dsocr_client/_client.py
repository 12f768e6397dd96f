"""``Client`` and ``AsyncClient``: the dsocr HTTP API on httpx, one method per thing a program does.

Both share the request shapes and the event parsing below; they differ only in awaiting. Every
error answer becomes a typed ``DsocrError`` (see ``errors``) in ``_check``, the one place that reads
error bodies; transport failures become ``ConnectionFailed`` where a request is sent.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse, connect_sse

from dsocr_client.errors import ConnectionFailed, QueueFull, ServerError, WaitTimeout, error_from_response
from dsocr_client.models import Progress, Task, Usage

Source = str | os.PathLike[str] | IO[bytes]
"""What ``submit`` takes: an ``http(s)://`` URL, a path, or a binary file object."""
ProgressCallback = Callable[[Progress], None]
AsyncProgressCallback = Callable[[Progress], Awaitable[None] | None]

DEFAULT_URL = "http://localhost:8000"
MAX_POLL_SECONDS = 60  # the server's cap on GET /v1/tasks/{id}?wait=
STREAM_READ_SECONDS = 60.0  # the server pings every 15 s by default; silence this long means a dead stream
MAX_STREAM_FAILURES = 5  # connections in a row that end without an event before falling back to polling
MAX_RECONNECT_PAUSE = 8.0  # s, the cap of the doubling pause between reconnections
EVENT_KINDS = frozenset({"status", "page", "end"})  # what the server sends; other kinds are ignored
# What ``download`` writes for each format it is asked for (the CLI's --format), before
# result.json, which is written last: full.md comes with the figures it links (images/).
FORMAT_FILES = {
    "md": "full.md",
    "json": "layout.json",
    "chunks": "chunks.json",
    "html": "result.html",
    "docx": "result.docx",
}
DEFAULT_FORMATS = ("md", "json")


def result_names(formats: Iterable[str], images: Iterable[str]) -> list[str]:
    """The files ``download`` writes for ``formats`` (keys of ``FORMAT_FILES``) of a task whose
    figures are ``images``, ``result.json`` excepted; ``ValueError`` for an unknown format."""
    chosen = list(dict.fromkeys(formats))
    unknown = [name for name in chosen if name not in FORMAT_FILES]
    if unknown:
        raise ValueError(f"unknown format {', '.join(unknown)}: choose from {', '.join(FORMAT_FILES)}")
    names = [FORMAT_FILES[name] for name in FORMAT_FILES if name in chosen]
    if "md" in chosen:
        names.extend(f"images/{image}" for image in images)
    return names


def _chunk_params(max_tokens: int | None, overlap: int | None, tokenizer: str | None) -> dict[str, Any]:
    params = {"max_tokens": max_tokens, "overlap": overlap, "tokenizer": tokenizer}
    return {name: value for name, value in params.items() if value is not None}


def _usage_params(start: date | str | None, end: date | str | None, tenant: str | None) -> dict[str, str]:
    """``from`` and ``to`` as ``YYYY-MM-DD`` and ``tenant``, each only when given (the server
    picks the rest)."""
    given = {"from": start, "to": end, "tenant": tenant}
    return {name: str(value) for name, value in given.items() if value is not None}


def _settings(base_url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """Base URL and headers: explicit arguments, else ``DSOCR_URL`` / ``DSOCR_API_KEY``."""
    url = base_url or os.environ.get("DSOCR_URL") or DEFAULT_URL
    key = api_key if api_key is not None else os.environ.get("DSOCR_API_KEY")
    return url.rstrip("/"), {"Authorization": f"Bearer {key}"} if key else {}


def _is_url(source: Source) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def _create_request(
    source: Source, options: dict[str, Any], idempotency_key: str | None, files: ExitStack
) -> dict[str, Any]:
    """Arguments of the create request for ``source``; a path is opened on ``files`` so the upload
    streams from disk (httpx reads it in chunks and rewinds it for a retry)."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    options = {name: value for name, value in options.items() if value is not None}
    if _is_url(source):
        return {
            "method": "POST",
            "url": "/v1/tasks",
            "json": {"url": source, "options": options},
            "headers": headers,
        }
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        handle: IO[bytes] = files.enter_context(path.open("rb"))
        name = path.name
    else:
        handle, name = source, Path(str(getattr(source, "name", "document"))).name
    data = {"options": json.dumps(options)} if options else None
    return {
        "method": "POST",
        "url": "/v1/tasks/upload",
        "files": {"file": (name, handle)},
        "data": data,
        "headers": headers,
    }


def _progress(task_id: str, event: ServerSentEvent) -> tuple[Progress, Task | None]:
    """The progress an event reports, and the task view for ``status`` and ``end`` events.

    Raises ``ValueError``, ``KeyError`` or ``TypeError`` for data that is not such an event."""
    data = event.json()
    if event.event == "page":
        progress = Progress(
            task_id, "running", data["pages_done"], data["pages_total"], data["page"], data["seconds"]
        )
        return progress, None
    task = Task.from_json(data)
    return Progress(task_id, task.status, task.pages_done, task.pages_total), task


def _remaining(deadline: float | None, task_id: str) -> float | None:
    """Seconds left before ``deadline``; raises ``WaitTimeout`` once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise WaitTimeout("wait_timeout", f"task {task_id} did not end in time; it keeps running")
    return left


def _result_path(task_id: str, name: str) -> str:
    """The route of a result file named as in the storage layout (``full.md`` is served as
    ``result.md``)."""
    return f"/v1/tasks/{task_id}/{'result.md' if name == 'full.md' else name}"


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_error:
        raise error_from_response(response)
    return response


async def _report(on_progress: AsyncProgressCallback | None, progress: Progress) -> None:
    if on_progress is not None:
        outcome = on_progress(progress)
        if inspect.isawaitable(outcome):
            await outcome


class _StreamUnavailable(Exception):
    """The event stream failed repeatedly; ``wait`` falls back to long-polling."""


class _BadEvent(Exception):
    """An event whose data is not what its kind carries: the stream is treated as broken."""


# What ends a connection to the event stream early without ending ``wait``: the network or a proxy
# (``TransportError``; ``SSEError`` when something other than an event stream answers; ``ServerError``
# for a 5xx, as a proxy answers while the server restarts) or a garbled event. Anything else the
# server says (``NotFound``, ``AuthError`` ...) is the answer, and raised.
_STREAM_FAILURES = (httpx.TransportError, SSEError, ServerError, _BadEvent)


class _EventCursor:
    """Where following one task's events stands, across the connections that ``wait`` opens.

    The protocol without the I/O, shared by ``Client`` and ``AsyncClient``: it says what to request
    next (resuming with ``Last-Event-ID`` after the last event received), which events count, and how
    long to pause after a connection ends before the task's ``end`` event.
    """

    def __init__(self, task_id: str, deadline: float | None, backoff: float) -> None:
        self.task_id = task_id
        self.deadline = deadline
        self.backoff = backoff
        self.last_id: str | None = None
        self.failures = 0  # connections in a row that ended without delivering an event

    def request(self, connect_timeout: float | None) -> dict[str, Any]:
        """Arguments of the next ``GET /v1/tasks/{id}/events``; raises ``WaitTimeout`` past the deadline."""
        left = _remaining(self.deadline, self.task_id)
        read = STREAM_READ_SECONDS if left is None else min(left, STREAM_READ_SECONDS)
        return {
            "method": "GET",
            "url": f"/v1/tasks/{self.task_id}/events",
            "headers": {"Last-Event-ID": self.last_id} if self.last_id else {},
            "timeout": httpx.Timeout(connect_timeout, read=read),
        }

    def accept(self, event: ServerSentEvent) -> tuple[Progress, Task | None] | None:
        """The progress ``event`` reports and, for the ``end`` event, the final task; ``None`` for
        an event that reports nothing. Raises ``WaitTimeout`` past the deadline, ``_BadEvent`` for
        garbled data (its id is not taken, so a reconnection asks for it again)."""
        _remaining(self.deadline, self.task_id)  # checked on keep-alives too: they arrive while pages run
        # The server's keep-alive comment (": ping") followed by a blank line comes out of httpx-sse as
        # an event without data that repeats the last id (it dispatches whatever the fields hold; the
        # SSE spec says to dispatch nothing when the data is empty). Kinds added later are not ours.
        if not event.data or event.event not in EVENT_KINDS:
            return None
        try:
            progress, task = _progress(self.task_id, event)
        except (ValueError, KeyError, TypeError) as exc:
            raise _BadEvent(f"unreadable {event.event!r} event {event.id!r}: {exc}") from exc
        self.last_id = event.id or self.last_id
        self.failures = 0
        return progress, task if event.event == "end" else None

    def dropped(self, cause: BaseException | None) -> float:
        """Count a connection that ended before the ``end`` event (``cause``: its error, ``None`` for
        a clean close) and return the seconds to pause before the next one: ``backoff``, doubling
        per failure in a row, at most ``MAX_RECONNECT_PAUSE`` and never past the deadline. Raises
        ``_StreamUnavailable`` after ``MAX_STREAM_FAILURES`` in a row, ``WaitTimeout`` past the deadline."""
        self.failures += 1
        if self.failures >= MAX_STREAM_FAILURES:
            raise _StreamUnavailable(f"{self.failures} event streams in a row failed") from cause
        pause = min(self.backoff * 2 ** (self.failures - 1), MAX_RECONNECT_PAUSE)
        left = _remaining(self.deadline, self.task_id)
        return pause if left is None else min(pause, left)


class Client:
    """A synchronous client of one dsocr server; safe to share between threads.

    ``base_url`` and ``api_key`` default to ``DSOCR_URL`` (else ``http://localhost:8000``) and
    ``DSOCR_API_KEY``. A ``429`` is retried up to ``max_retries`` times, sleeping its
    ``Retry-After`` (at most ``max_retry_wait`` seconds); then ``QueueFull`` is raised. ``wait``
    pauses ``reconnect_backoff`` seconds before reconnecting a dropped event stream, doubling while
    connections keep failing.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        reconnect_backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url, headers = _settings(base_url, api_key)
        self.base_url = url
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.reconnect_backoff = reconnect_backoff
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send a request, retrying 429; raises the typed error of any other error answer."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise ConnectionFailed("connection_failed", f"{self.base_url}: {exc}") from exc
            if response.status_code != 429 or attempt == self.max_retries:
                return _check(response)
            error = error_from_response(response)
            assert isinstance(error, QueueFull)
            time.sleep(min(error.retry_after, self.max_retry_wait))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def submit(self, source: Source, *, idempotency_key: str | None = None, **options: Any) -> Task:
        """Queue ``source`` (URL, path or binary file object) with ``options`` (``mode``, ``pages``,
        ``dpi`` ...; ``None`` values are left out) and return its task.

        With ``idempotency_key``, a repeat of the same request returns the first task, so a timed-out
        submit may be sent again safely. Raises ``UnsupportedFile``, ``InvalidInput``,
        ``PayloadTooLarge``, ``QueueFull`` (after the retries), ``AuthError``, ``ConnectionFailed``.
        """
        with ExitStack() as files:
            request = _create_request(source, options, idempotency_key, files)
            return Task.from_json(self._send(**request).json())

    def get(self, task_id: str, *, wait: float = 0) -> Task:
        """The task now; with ``wait`` (at most 60 s), once it ends or the wait is over."""
        params = {"wait": wait} if wait else None
        return Task.from_json(self._send("GET", f"/v1/tasks/{task_id}", params=params).json())

    def wait(
        self, task_id: str, on_progress: ProgressCallback | None = None, timeout: float | None = None
    ) -> Task:
        """Block until the task ends and return it (succeeded, failed or canceled: check ``status``).

        Follows the task's event stream, skipping its keep-alive comments and resuming with
        ``Last-Event-ID`` when it drops before the ``end`` event (a ``204`` then means the task is
        over, and its view is read), so ``on_progress`` sees each status change and each finished
        page once. Between reconnections it pauses ``reconnect_backoff`` seconds, doubling; after
        ``MAX_STREAM_FAILURES`` connections in a row that bring no event it long-polls instead.
        Raises ``WaitTimeout`` after ``timeout`` seconds, ``NotFound`` for a task this key cannot
        see; whatever ``on_progress`` raises ends the wait (the task keeps running).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return self._follow(task_id, on_progress, deadline)
        except _StreamUnavailable:
            return self._poll(task_id, on_progress, deadline)

    def _follow(self, task_id: str, on_progress: ProgressCallback | None, deadline: float | None) -> Task:
        cursor = _EventCursor(task_id, deadline, self.reconnect_backoff)
        while True:
            cause: BaseException | None = None
            try:
                with connect_sse(self._http, **cursor.request(self._http.timeout.connect)) as source:
                    if source.response.status_code == 204:  # resumed after the end: nothing more comes
                        return self.get(task_id)
                    if source.response.is_error:
                        source.response.read()
                        _check(source.response)
                    for event in source.iter_sse():
                        update = cursor.accept(event)
                        if update is None:
                            continue
                        progress, task = update
                        if on_progress:
                            on_progress(progress)
                        if task is not None:
                            return task
            except _STREAM_FAILURES as exc:
                cause = exc
            # the stream ended before its end event (a restart, a proxy): resume where it stopped
            time.sleep(cursor.dropped(cause))

    def _poll(self, task_id: str, on_progress: ProgressCallback | None, deadline: float | None) -> Task:
        seen: tuple[str, int] | None = None
        while True:
            left = _remaining(deadline, task_id)
            task = self.get(task_id, wait=MAX_POLL_SECONDS if left is None else min(left, MAX_POLL_SECONDS))
            if on_progress and (task.status, task.pages_done) != seen:
                on_progress(Progress(task_id, task.status, task.pages_done, task.pages_total))
            seen = (task.status, task.pages_done)
            if task.is_final:
                return task

    def download(
        self, task_id: str, out_dir: str | os.PathLike[str], formats: Iterable[str] = DEFAULT_FORMATS
    ) -> Task:
        """Write a succeeded task's results in ``formats`` under ``out_dir`` (the server's storage
        layout), then ``result.json``, and return the task. Formats (``FORMAT_FILES``): ``md``
        (``full.md`` and the figures it links, ``images/``), ``json`` (``layout.json``), ``chunks``
        (``chunks.json``), ``html`` (``result.html``), ``docx`` (``result.docx``).

        ``result.json`` is written last, each file through a temporary name, so its presence means
        the download is complete. Raises ``ValueError`` for an unknown format before any request,
        ``Conflict`` while the task is unfinished.
        """
        out, formats = Path(out_dir), tuple(formats)
        result_names(formats, [])  # an unknown format fails before anything is fetched
        result = self._send("GET", f"/v1/tasks/{task_id}/result.json").content
        task = Task.from_json(json.loads(result))
        names = result_names(formats, task.images)
        (out / "images" if "md" in formats else out).mkdir(parents=True, exist_ok=True)
        for name in names:
            with self._http.stream("GET", _result_path(task_id, name)) as response:
                if response.is_error:
                    response.read()
                    _check(response)
                _write_atomically(out / name, response.iter_bytes())
        _write_atomically(out / "result.json", iter([result]))
        return task

    def result(self, task_id: str, name: str) -> bytes:
        """One result file of a succeeded task: ``full.md``, ``layout.json``, ``result.json``,
        ``chunks.json``, ``result.html``, ``result.docx`` or ``images/<name>``. Raises ``Conflict``
        while unfinished, ``NotFound`` for an unknown name."""
        return self._send("GET", _result_path(task_id, name)).content

    def chunks(
        self,
        task_id: str,
        *,
        max_tokens: int | None = None,
        overlap: int | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """``chunks.json`` of a succeeded task: the document split for retrieval, each chunk with its
        text, heading path, pages, boxes and token count. Unset arguments take the server's defaults
        (512 tokens, no overlap, ``"chars"``: an estimate); ``tokenizer`` may name a Hugging Face
        repository in the server's cache. Raises ``InvalidInput`` for limits or a tokenizer the
        server refuses, ``Conflict`` while unfinished."""
        params = _chunk_params(max_tokens, overlap, tokenizer)
        response = self._send("GET", f"/v1/tasks/{task_id}/chunks.json", params=params)
        chunk_set: dict[str, Any] = response.json()
        return chunk_set

    def cancel(self, task_id: str) -> Task:
        """Cancel a queued task, or a running one at its next page; ``Conflict`` if it already ended."""
        return Task.from_json(self._send("DELETE", f"/v1/tasks/{task_id}").json())

    def usage(
        self, start: date | str | None = None, end: date | str | None = None, *, tenant: str | None = None
    ) -> Usage:
        """What this key's tenant used per UTC day from ``start`` to ``end`` (inclusive; the server's
        defaults where ``None``: the 30 days up to today); an admin key sees every tenant, or the one
        ``tenant`` names. Raises ``InvalidInput`` for dates the server refuses, ``ApiError`` (403)
        for another tenant without an admin key, ``NotFound`` from a server without usage."""
        params = _usage_params(start, end, tenant)
        return Usage.from_json(self._send("GET", "/v1/usage", params=params).json())

    def list(
        self, status: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> Iterator[Task]:
        """Your tasks, newest first, at most ``limit`` (all when ``None``), fetched a page at a time."""
        cursor: str | None = None
        yielded = 0
        while True:
            page = self._send(
                "GET", "/v1/tasks", params=_list_params(status, page_size, limit, yielded, cursor)
            )
            body = page.json()
            for item in body["tasks"]:
                yield Task.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            cursor = body.get("next_cursor")
            if not cursor:
                return


def _list_params(
    status: str | None, page_size: int, limit: int | None, yielded: int, cursor: str | None
) -> dict[str, Any]:
    size = page_size if limit is None else min(page_size, limit - yielded)
    params: dict[str, Any] = {"limit": max(1, min(size, 100))}
    if status:
        params["status"] = status
    if cursor:
        params["cursor"] = cursor
    return params


def _write_atomically(path: Path, chunks: Iterator[bytes]) -> None:
    """Write through ``<name>.part`` and rename, so a file that exists is a whole file."""
    partial = path.with_name(path.name + ".part")
    with partial.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)
    partial.replace(path)


class AsyncClient:
    """The asynchronous twin of ``Client``: the same methods, awaited; ``list`` is an async iterator."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        max_retry_wait: float = 60.0,
        reconnect_backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url, headers = _settings(base_url, api_key)
        self.base_url = url
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.reconnect_backoff = reconnect_backoff
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """As ``Client._send``."""
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                raise ConnectionFailed("connection_failed", f"{self.base_url}: {exc}") from exc
            if response.status_code != 429 or attempt == self.max_retries:
                return _check(response)
            error = error_from_response(response)
            assert isinstance(error, QueueFull)
            await asyncio.sleep(min(error.retry_after, self.max_retry_wait))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def submit(self, source: Source, *, idempotency_key: str | None = None, **options: Any) -> Task:
        """As ``Client.submit``."""
        with ExitStack() as files:
            request = _create_request(source, options, idempotency_key, files)
            return Task.from_json((await self._send(**request)).json())

    async def get(self, task_id: str, *, wait: float = 0) -> Task:
        """As ``Client.get``."""
        params = {"wait": wait} if wait else None
        return Task.from_json((await self._send("GET", f"/v1/tasks/{task_id}", params=params)).json())

    async def wait(
        self,
        task_id: str,
        on_progress: AsyncProgressCallback | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - as Client.wait; the deadline spans reconnects
    ) -> Task:
        """As ``Client.wait``; ``on_progress`` may also be a coroutine function, awaited in turn."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return await self._follow(task_id, on_progress, deadline)
        except _StreamUnavailable:
            return await self._poll(task_id, on_progress, deadline)

    async def _follow(
        self, task_id: str, on_progress: AsyncProgressCallback | None, deadline: float | None
    ) -> Task:
        cursor = _EventCursor(task_id, deadline, self.reconnect_backoff)
        while True:
            cause: BaseException | None = None
            try:
                async with aconnect_sse(self._http, **cursor.request(self._http.timeout.connect)) as source:
                    if source.response.status_code == 204:
                        return await self.get(task_id)
                    if source.response.is_error:
                        await source.response.aread()
                        _check(source.response)
                    async for event in source.aiter_sse():
                        update = cursor.accept(event)
                        if update is None:
                            continue
                        progress, task = update
                        await _report(on_progress, progress)
                        if task is not None:
                            return task
            except _STREAM_FAILURES as exc:
                cause = exc
            await asyncio.sleep(cursor.dropped(cause))

    async def _poll(
        self, task_id: str, on_progress: AsyncProgressCallback | None, deadline: float | None
    ) -> Task:
        seen: tuple[str, int] | None = None
        while True:
            left = _remaining(deadline, task_id)
            wait = MAX_POLL_SECONDS if left is None else min(left, MAX_POLL_SECONDS)
            task = await self.get(task_id, wait=wait)
            if (task.status, task.pages_done) != seen:
                await _report(on_progress, Progress(task_id, task.status, task.pages_done, task.pages_total))
            seen = (task.status, task.pages_done)
            if task.is_final:
                return task

    async def download(
        self, task_id: str, out_dir: str | os.PathLike[str], formats: Iterable[str] = DEFAULT_FORMATS
    ) -> Task:
        """As ``Client.download``; files are written in a thread, off the event loop."""
        out, formats = Path(out_dir), tuple(formats)
        result_names(formats, [])
        result = (await self._send("GET", f"/v1/tasks/{task_id}/result.json")).content
        task = Task.from_json(json.loads(result))
        names = result_names(formats, task.images)
        folder = out / "images" if "md" in formats else out
        await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
        for name in names:
            response = await self._send("GET", _result_path(task_id, name))
            await asyncio.to_thread(_write_atomically, out / name, iter([response.content]))
        await asyncio.to_thread(_write_atomically, out / "result.json", iter([result]))
        return task

    async def result(self, task_id: str, name: str) -> bytes:
        """As ``Client.result``."""
        return (await self._send("GET", _result_path(task_id, name))).content

    async def chunks(
        self,
        task_id: str,
        *,
        max_tokens: int | None = None,
        overlap: int | None = None,
        tokenizer: str | None = None,
    ) -> dict[str, Any]:
        """As ``Client.chunks``."""
        params = _chunk_params(max_tokens, overlap, tokenizer)
        response = await self._send("GET", f"/v1/tasks/{task_id}/chunks.json", params=params)
        chunk_set: dict[str, Any] = response.json()
        return chunk_set

    async def cancel(self, task_id: str) -> Task:
        """As ``Client.cancel``."""
        return Task.from_json((await self._send("DELETE", f"/v1/tasks/{task_id}")).json())

    async def usage(
        self, start: date | str | None = None, end: date | str | None = None, *, tenant: str | None = None
    ) -> Usage:
        """As ``Client.usage``."""
        response = await self._send("GET", "/v1/usage", params=_usage_params(start, end, tenant))
        return Usage.from_json(response.json())

    async def list(
        self, status: str | None = None, limit: int | None = None, page_size: int = 100
    ) -> AsyncIterator[Task]:
        """As ``Client.list``, an async iterator."""
        cursor: str | None = None
        yielded = 0
        while True:
            params = _list_params(status, page_size, limit, yielded, cursor)
            body = (await self._send("GET", "/v1/tasks", params=params)).json()
            for item in body["tasks"]:
                yield Task.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            cursor = body.get("next_cursor")
            if not cursor:
                return
