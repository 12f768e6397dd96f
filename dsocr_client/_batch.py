"""``dsocr convert``'s work: find the documents, convert N at a time, report, summarise.

Each document runs in a worker thread on one shared ``Client`` (httpx clients are thread-safe): the
work is waiting on the network, and threads keep Ctrl-C simple, since the main thread only waits and
can cancel the server tasks in flight while the workers see their tasks end.
"""

from __future__ import annotations

import contextlib
import glob
import json
import queue
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dsocr_client._client import DEFAULT_FORMATS, Client, result_names
from dsocr_client.errors import DsocrError, describe_error
from dsocr_client.models import Progress, Task

DOCUMENT_SUFFIXES = frozenset({".pdf", ".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"})


class UsageError(Exception):
    """A command line that names nothing to convert; the CLI exits with 2."""


@dataclass(frozen=True)
class Document:
    """One input file and the folder its results go to."""

    path: Path
    name: str
    out_dir: Path


@dataclass
class Outcome:
    """What happened to one document: ``succeeded``, ``skipped`` (results already complete),
    ``failed`` or ``canceled``, or ``running`` when an interrupt left its task on the server;
    ``error`` says why for all but the first two. ``seconds`` is the server's processing time."""

    path: str
    output: str
    status: str
    task_id: str | None = None
    pages: int = 0
    seconds: float | None = None
    error: str | None = None

    @property
    def pages_per_second(self) -> float | None:
        return round(self.pages / self.seconds, 3) if self.pages and self.seconds else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "pages_per_second": self.pages_per_second}


def find_documents(patterns: Iterable[str], out_root: Path) -> list[Document]:
    """The documents that files, folders (searched recursively for PDFs and images) and globs name,
    in a stable order, each with its own output folder ``out_root/<stem>`` (``<stem>-2`` ... when
    two share a stem). Raises ``UsageError`` for a pattern that matches nothing."""
    paths: list[Path] = []
    for pattern in patterns:
        given = Path(pattern)
        if given.is_dir():
            found = sorted(
                p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES
            )
        elif given.is_file():
            found = [given]  # named explicitly: sent as it is, the server says if it is no document
        else:
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not found:
            raise UsageError(f"no documents found at {pattern!r}")
        paths.extend(p for p in found if p.resolve() not in {q.resolve() for q in paths})
    documents: list[Document] = []
    taken: set[str] = set()
    for path in paths:
        name, n = path.stem, 1
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}"
        taken.add(name)
        documents.append(Document(path, name, out_root / name))
    return documents


def complete_result(out_dir: Path, formats: Iterable[str] = DEFAULT_FORMATS) -> Task | None:
    """The task a previous run downloaded completely to ``out_dir`` in ``formats``, or ``None``.

    ``download`` writes ``result.json`` last, so it vouches for the other files; they are checked
    anyway, since people delete files by hand (or ask for a format the earlier run did not write)."""
    try:
        task = Task.from_json(json.loads((out_dir / "result.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None
    names = result_names(formats, task.images)
    if task.status != "succeeded" or not all((out_dir / name).is_file() for name in names):
        return None
    return task


class Reporter(Protocol):
    """Shows the batch as it goes: progress bars on a terminal, log lines elsewhere."""

    def started(self, document: Document) -> None: ...
    def progressed(self, document: Document, progress: Progress) -> None: ...
    def finished(self, document: Document, outcome: Outcome) -> None: ...


@dataclass
class Batch:
    """Converts ``documents`` with ``jobs`` in flight; ``options`` go with every submit."""

    client: Client
    documents: list[Document]
    options: dict[str, Any]
    reporter: Reporter
    jobs: int = 2
    force: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS  # what to write of each result (see Client.download)
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[str, str] = field(default_factory=dict)  # document name -> task id
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        """Convert every document; blocks until all are done. Ctrl-C (``KeyboardInterrupt``) reaches
        the caller, who then calls ``interrupt``."""
        pending: queue.SimpleQueue[Document] = queue.SimpleQueue()
        for document in self.documents:
            pending.put(document)
        # daemon threads: with --detach the process may leave while they still wait on the server
        workers = [
            threading.Thread(target=self._work, args=(pending,), daemon=True)
            for _ in range(max(1, self.jobs))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.2)  # a timed join keeps the main thread responsive to Ctrl-C

    def interrupt(self, *, cancel: bool, grace_seconds: float = 15.0) -> None:
        """Start nothing more; with ``cancel``, cancel the server tasks in flight and give the workers
        ``grace_seconds`` to record them as canceled."""
        self._stop.set()
        if not cancel:
            return
        with self._lock:
            task_ids = list(self.in_flight.values())
        for task_id in task_ids:
            # Conflict, NotFound: it ended or expired meanwhile. Any other refusal leaves it running,
            # which ``results`` then says, with its task id.
            with contextlib.suppress(DsocrError):
                self.client.cancel(task_id)
        deadline = time.monotonic() + grace_seconds
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)

    def results(self) -> list[Outcome]:
        """One outcome per document, in the documents' order: every document is accounted for.

        After an interrupt, a document never submitted is ``canceled`` and one whose task was left
        running (``interrupt(cancel=False)``, or a cancel the grace period did not see end) is
        ``running``, with its task id; each says why in ``error``."""
        with self._lock:
            recorded = {outcome.path: outcome for outcome in self.outcomes}
            in_flight = dict(self.in_flight)
        results = []
        for document in self.documents:
            outcome = recorded.get(str(document.path))
            if outcome is None:
                outcome = Outcome(str(document.path), str(document.out_dir), "canceled")
                outcome.task_id = in_flight.get(document.name)
                if outcome.task_id is not None:
                    outcome.status, outcome.error = "running", "interrupted while its task ran on the server"
                else:
                    outcome.error = "interrupted before it was sent"
            results.append(outcome)
        return results

    def _work(self, pending: queue.SimpleQueue[Document]) -> None:
        while not self._stop.is_set():
            try:
                document = pending.get_nowait()
            except queue.Empty:
                return
            outcome = Outcome(str(document.path), str(document.out_dir), "failed")
            try:
                self.reporter.started(document)
                self._convert(document, outcome)
            # Anything at all (a bug, a full disk, a reporter that fails): it becomes this document's
            # failure, and the thread goes on. A thread's exception would otherwise end the thread
            # and the document with it, printed at best (SystemExit not even that).
            except BaseException as exc:
                outcome.status, outcome.error = "failed", describe_error(exc)
            with self._lock:
                self.outcomes.append(outcome)
            try:
                self.reporter.finished(document, outcome)
            except BaseException as exc:  # as above; the outcome is in the list already
                with self._lock:
                    outcome.status, outcome.error = "failed", describe_error(exc)

    def _convert(self, document: Document, outcome: Outcome) -> None:
        """Convert ``document`` and download its results, filling in ``outcome`` (``succeeded`` only
        once every file is written); raises what goes wrong, which ``_work`` records as the reason."""
        done = None if self.force else complete_result(document.out_dir, self.formats)
        if done is not None:
            outcome.status, outcome.task_id = "skipped", done.task_id
            outcome.pages, outcome.seconds = done.pages_total, done.duration_seconds
            return
        task = self.client.submit(document.path, **self.options)
        outcome.task_id = task.task_id
        with self._lock:
            self.in_flight[document.name] = task.task_id
        try:
            task = self.client.wait(task.task_id, lambda p: self.reporter.progressed(document, p))
        finally:
            with self._lock:
                self.in_flight.pop(document.name, None)
        outcome.pages, outcome.seconds = task.pages_total, task.duration_seconds
        if task.error:
            outcome.error = f"{task.error.code}: {task.error.message}"
        if task.status == "succeeded":
            shutil.rmtree(document.out_dir, ignore_errors=True)  # no stale figures from an older run
            self.client.download(task.task_id, document.out_dir, self.formats)
        outcome.status = task.status
