"""The store seam: task records and their files behind one interface, whatever holds them.

``LocalStore`` (one process, one disk) and ``SharedStore`` (records in Redis, files in an
S3-compatible bucket, for API replicas and workers on several machines) both satisfy ``TaskStore``.
Routers, the task service, the worker and the pipeline see this protocol only: streams and bytes,
never a path (except the renderer's input, lent for the length of a ``with`` block).

Every method blocks: callers on the event loop run them in a thread.

Fencing: ``TaskRecord.lease`` is raised by each worker that takes a task. A shared store refuses
(``LeaseLost``) a ``save`` whose expected lease is not the stored one, and a worker writes its result
files under its own lease, so a worker that stalled while another took its task over can change
neither the record nor the results the task ends with. The local store has one process writing,
serialised by the task service's lock, and ignores leases.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from PIL import Image

from app import lossless
from app.records import TaskRecord, TaskStatus, may_see

Chunks = bytes | Iterable[bytes]
"""A file's content whole, or as chunks to be written one after another."""

PREVIEW_MAX_SIDE = 1600  # px; enough to read a page in the console, about 130 kB a page as WebP


def raw_name(number: int, attempt: int = 0) -> str:
    """The file name of page ``number``'s raw output: ``pNNNN.json`` for the first attempt,
    ``pNNNN.rK.json`` for retry rung ``K``."""
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    return f"p{number:04d}.json" if attempt == 0 else f"p{number:04d}.r{attempt}.json"


def chunks_of(data: Chunks) -> Iterable[bytes]:
    """``data`` as chunks: whole bytes are one."""
    return (data,) if isinstance(data, bytes) else data


def page_names(number: int) -> tuple[str, str]:
    """The names rendered page ``number`` may be stored under, in ``pages/``: as ``write_preview``
    writes it (``app.lossless``), then as PNG (releases before 2026-12 stored pages so; still read,
    never written)."""
    return f"p{number:04d}{lossless.SUFFIX}", f"p{number:04d}.png"


def encode_preview(page: bytes) -> bytes:
    """A page's preview from its stored form (``page_names``): a WebP scaled down to
    ``PREVIEW_MAX_SIDE``, about 35 ms for a page at 144 dpi (method 0: the fastest encoder setting;
    a preview needs no better)."""
    with Image.open(io.BytesIO(page), formats=[lossless.FORMAT, "PNG"]) as page_image:
        preview = page_image.convert("RGB")
    preview.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    preview.save(out, format="WEBP", quality=75, method=0)
    return out.getvalue()


@dataclass(frozen=True)
class RecordSummary:
    """What listing and expiry need of a record, without reading every record in full."""

    task_id: str
    created_at: datetime
    status: TaskStatus
    owner: str | None
    finished_at: datetime | None

    def visible_to(self, caller: str | None) -> bool:
        """Whether ``caller`` may see the task (the rule of ``TaskRecord.visible_to``)."""
        return may_see(caller, self.owner)


def summary_of(record: TaskRecord) -> RecordSummary:
    return RecordSummary(record.task_id, record.created_at, record.status, record.owner, record.finished_at)


class TaskStore(Protocol):
    """Task records, idempotency entries, and each task's input, pages, raw output and results."""

    # --- uploads and health ---

    def spool_path(self) -> Path:
        """A fresh local path for an incoming file; the caller deletes it or hands it to ``create``."""

    def clear_spool(self) -> None:
        """Remove spool files an interrupted upload left behind."""

    def writable(self) -> bool:
        """Whether records and files can be written now (readiness)."""

    # --- records ---

    def create(self, record: TaskRecord, spooled_input: Path) -> None:
        """Store a new task with its input; the record never points at a missing input."""

    def save(self, record: TaskRecord, *, expect_lease: int | None = None) -> None:
        """Write ``record``; a shared store first checks that the stored lease is ``expect_lease``
        (default: ``record.lease``) and raises ``LeaseLost`` otherwise."""

    def load(self, task_id: str) -> TaskRecord:
        """The record; ``TaskNotFound`` when there is none."""

    def list_records(self) -> Iterator[TaskRecord]:
        """Every record (recovery and follow-ups at start-up)."""

    def summaries(self) -> list[RecordSummary]:
        """A summary of every record, in no particular order."""

    def delete(self, task_id: str) -> None:
        """Remove the task, its record and every file of it."""

    def request_cancel(self, task_id: str) -> None:
        """Ask the worker running the task to stop it; it reads ``cancel_requested`` on ``load``."""

    # --- idempotency entries, named by a hash of owner and key ---

    def read_key(self, name: str) -> dict[str, Any] | None: ...

    def write_key(self, name: str, entry: dict[str, Any]) -> None: ...

    def delete_key(self, name: str) -> None: ...

    def key_names(self) -> list[str]:
        """Entries to check for expiry (a store that expires them itself returns none)."""

    def key_lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Hold entry ``name`` against other processes while a request finds or creates its task
        (blocking). One process needs nothing here: ``IdempotencyKeys`` serialises its own requests."""

    # --- the pipeline's files ---

    def input_file(self, record: TaskRecord) -> contextlib.AbstractContextManager[Path]:
        """A local path to the task's input, valid inside the ``with`` block."""

    def write_raw(self, task_id: str, number: int, payload: dict[str, Any], attempt: int = 0) -> None:
        """Store the model's output for page ``number``: its first attempt (``attempt`` 0,
        ``raw/pNNNN.json``) or the retry rung ``attempt`` (``raw/pNNNN.rK.json``), replacing any
        earlier one. Every attempt is kept; ``delete`` removes them with the task."""

    def read_raw(self, task_id: str, number: int, attempt: int = 0) -> dict[str, Any] | None:
        """What ``write_raw`` stored for page ``number`` and ``attempt``; ``None`` when nothing
        (or something unreadable) is stored there."""

    def write_preview(self, task_id: str, number: int, page: bytes) -> None:
        """Store page ``number`` as rendered, ``app.lossless`` encoded, replacing any earlier one.
        Its preview is made from it when first asked for: most pages are never looked at, and a
        WebP costs ten times the encoding (a preview made earlier stays: a task's page renders
        alike each time)."""

    def open_preview(self, record: TaskRecord, number: int) -> BinaryIO:
        """Page ``number``'s preview, a WebP of at most ``PREVIEW_MAX_SIDE`` px a side;
        ``ResultNotFound`` until the page is rendered."""

    def write_image(self, task_id: str, name: str, png: bytes, *, lease: int = 0) -> None:
        """Store figure crop ``name`` (``pNNNN_NN.png``), a PNG, under ``lease``."""

    def write_result(self, task_id: str, name: str, data: Chunks, *, lease: int = 0) -> None:
        """Store result file ``name`` from ``data``: its bytes, or an iterable of chunks that is
        written as it is read (a result never needs to be whole in memory)."""

    def clear_results(self, task_id: str, *, lease: int) -> None:
        """Drop the results of earlier attempts before attempt ``lease`` writes its own."""

    # --- downloads: readers take the record the caller holds, and never read it again ---

    def open_result(self, record: TaskRecord, name: str) -> BinaryIO:
        """``full.md``, ``layout.json``, ``result.json`` or ``images/<name>`` of the attempt that
        ``record`` ended with; ``ResultNotFound`` for anything else."""

    def result_url(self, record: TaskRecord, name: str) -> str | None:
        """A URL the client may fetch the file from directly (a presigned GET), or ``None`` to
        stream it through the service."""
