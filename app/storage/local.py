"""Task records and result files on the local disk: the only code that builds paths.

Layout, one directory per task under ``<data_dir>/tasks/<task_id>/``::

    task.json      the record, written atomically (temp file + fsync + rename)
    input/<name>   the original upload or download
    raw/pNNNN.json the model's raw output per page, written as soon as the page is done
    raw/pNNNN.rK.json  the output of the page's retry rung K, when it was retried
    pages/pNNNN.png  each rendered page, lossless, written as it renders
    pages/pNNNN.webp its preview (at most 1600 px a side), made from it when first asked for
    images/        figure crops, pNNNN_NN.png
    full.md, layout.json, result.json

and ``<data_dir>/idempotency/<key hash>.json``, one small entry per ``Idempotency-Key``.

Routers never see a path: they get open binary streams. Blocking I/O; callers on the event loop
run these methods in a thread.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from app.errors import ResultNotFound, StorageError, TaskNotFound
from app.records import TASK_ID_PATTERN, TaskRecord
from app.result_files import IMAGE_NAME, RESULT_FILES
from app.storage.base import (
    Chunks,
    RecordSummary,
    chunks_of,
    encode_preview,
    page_names,
    raw_name,
    summary_of,
)

KEY_NAME = re.compile(r"^[0-9a-f]{64}$")  # an idempotency entry: a SHA-256 hex digest, never the key


def _atomic_write(path: Path, data: Chunks) -> None:
    """Write ``data`` so readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks_of(data):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalStore:
    """Task directories under ``root/tasks`` and upload spool files under ``root/spool``.

    A ``TaskStore`` for one process: it alone writes the records (the task service serialises
    status changes), so leases are not checked and results have one place per task.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tasks = root / "tasks"
        self._spool = root / "spool"
        self._keys = root / "idempotency"
        try:
            for folder in (self._tasks, self._spool, self._keys):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data directory {root}: {exc.strerror}") from exc
        # Built by one scan at first use, then kept current by save() and delete(): it holds while
        # this process is the only writer of the records, as the single-process design has it.
        self._summaries: dict[str, RecordSummary] | None = None
        self._summaries_lock = threading.Lock()  # saves run in worker threads

    # --- paths (private: nothing outside this class joins them) ---

    def _dir(self, task_id: str) -> Path:
        if not TASK_ID_PATTERN.match(task_id):
            raise TaskNotFound(f"no task {task_id!r}")
        return self._tasks / task_id

    # --- spool: uploads land here before a task exists ---

    def spool_path(self) -> Path:
        """A fresh path for an incoming file; the caller deletes it or hands it to ``create``."""
        return self._spool / uuid.uuid4().hex

    def clear_spool(self) -> None:
        """Remove files left by uploads that a crash interrupted."""
        for leftover in self._spool.iterdir():
            leftover.unlink(missing_ok=True)

    def writable(self) -> bool:
        return os.access(self._tasks, os.W_OK)

    # --- records ---

    def create(self, record: TaskRecord, spooled_input: Path) -> None:
        """Store a new task: its input moves in first, so a record never points at a missing file."""
        task_dir = self._dir(record.task_id)
        try:
            (task_dir / "input").mkdir(parents=True)
            os.replace(spooled_input, task_dir / "input" / record.input_name)
            self.save(record)
        except OSError as exc:
            shutil.rmtree(task_dir, ignore_errors=True)
            raise StorageError(f"cannot store task {record.task_id}: {exc.strerror}") from exc

    def save(self, record: TaskRecord, *, expect_lease: int | None = None) -> None:
        try:
            _atomic_write(self._dir(record.task_id) / "task.json", record.model_dump_json(indent=2).encode())
        except OSError as exc:
            raise StorageError(f"cannot write the record of task {record.task_id}: {exc.strerror}") from exc
        with self._summaries_lock:
            if self._summaries is not None:
                self._summaries[record.task_id] = summary_of(record)

    def load(self, task_id: str) -> TaskRecord:
        path = self._dir(task_id) / "task.json"
        try:
            return TaskRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError as exc:
            raise TaskNotFound(f"no task {task_id!r}") from exc

    def list_records(self) -> Iterator[TaskRecord]:
        """Every stored record; unreadable ones are skipped (a crash before the first save)."""
        for task_dir in self._tasks.iterdir():
            if not TASK_ID_PATTERN.match(task_dir.name):
                continue
            with contextlib.suppress(TaskNotFound, ValueError):
                yield self.load(task_dir.name)

    def delete(self, task_id: str) -> None:
        shutil.rmtree(self._dir(task_id), ignore_errors=True)
        with self._summaries_lock:
            if self._summaries is not None:
                self._summaries.pop(task_id, None)

    def request_cancel(self, task_id: str) -> None:
        """Nothing to store: the worker that runs the task is in this process and told directly."""

    def summaries(self) -> list[RecordSummary]:
        """A summary of every stored record, in no particular order."""
        with self._summaries_lock:
            if self._summaries is None:
                self._summaries = {record.task_id: summary_of(record) for record in self.list_records()}
            return list(self._summaries.values())

    # --- idempotency entries (app.tasks.idempotency), named by a hash of owner and key ---

    def _key_path(self, name: str) -> Path:
        if not KEY_NAME.match(name):
            raise StorageError(f"refusing an idempotency entry named {name!r}")
        return self._keys / f"{name}.json"

    def read_key(self, name: str) -> dict[str, Any] | None:
        """The entry stored under ``name``, or ``None`` when there is none (or it is unreadable)."""
        try:
            entry = json.loads(self._key_path(name).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # atomic writes never tear; a hand-edited entry just starts afresh
        return entry if isinstance(entry, dict) else None

    def write_key(self, name: str, entry: dict[str, Any]) -> None:
        try:
            _atomic_write(self._key_path(name), json.dumps(entry).encode())
        except OSError as exc:
            raise StorageError(f"cannot write an idempotency entry: {exc.strerror}") from exc

    def delete_key(self, name: str) -> None:
        self._key_path(name).unlink(missing_ok=True)

    def key_lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the only process: IdempotencyKeys' own lock is enough

    def key_names(self) -> list[str]:
        return [path.stem for path in self._keys.glob("*.json") if KEY_NAME.match(path.stem)]

    # --- the pipeline's files ---

    @contextlib.contextmanager
    def input_file(self, record: TaskRecord) -> Iterator[Path]:
        """A local path to the task's input for the renderer, valid inside the ``with`` block."""
        path = self._dir(record.task_id) / "input" / record.input_name
        if not path.is_file():
            raise StorageError(f"the input of task {record.task_id} is missing")
        yield path

    def write_raw(self, task_id: str, number: int, payload: dict[str, Any], attempt: int = 0) -> None:
        raw_dir = self._dir(task_id) / "raw"
        raw_dir.mkdir(exist_ok=True)
        data = json.dumps(payload, ensure_ascii=False).encode()
        _atomic_write(raw_dir / raw_name(number, attempt), data)

    def read_raw(self, task_id: str, number: int, attempt: int = 0) -> dict[str, Any] | None:
        path = self._dir(task_id) / "raw" / raw_name(number, attempt)
        try:
            return json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn write cannot happen (atomic), but a hand-edited file must not stop a task

    def write_preview(self, task_id: str, number: int, page: bytes) -> None:
        """Store page ``number`` (the document's page number) in ``pages/`` (``page_names``),
        replacing any earlier one. A preview made of an earlier one stays: a task's page renders
        alike each time."""
        pages_dir = self._dir(task_id) / "pages"
        pages_dir.mkdir(exist_ok=True)
        _atomic_write(pages_dir / page_names(number)[0], page)

    def open_preview(self, record: TaskRecord, number: int) -> BinaryIO:
        """An open stream of page ``number``'s preview, made from the stored page and kept the
        first time it is asked for; ``ResultNotFound`` until the page is rendered."""
        pages_dir = self._dir(record.task_id) / "pages"
        with contextlib.suppress(FileNotFoundError):
            return (pages_dir / f"p{number:04d}.webp").open("rb")
        for name in page_names(number):
            with contextlib.suppress(FileNotFoundError):
                preview = encode_preview((pages_dir / name).read_bytes())
                break
        else:
            raise ResultNotFound(f"task {record.task_id} has no rendered page {number} (yet)")
        with contextlib.suppress(OSError):  # a full disk costs the next request the encoding again
            _atomic_write(pages_dir / f"p{number:04d}.webp", preview)
        return io.BytesIO(preview)

    def write_image(self, task_id: str, name: str, png: bytes, *, lease: int = 0) -> None:
        if not IMAGE_NAME.match(name):
            raise StorageError(f"refusing to write an image named {name!r}")
        image_dir = self._dir(task_id) / "images"
        image_dir.mkdir(exist_ok=True)
        tmp = image_dir / f".{name}.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, image_dir / name)

    def write_result(self, task_id: str, name: str, data: Chunks, *, lease: int = 0) -> None:
        if name not in RESULT_FILES:
            raise StorageError(f"unknown result file {name!r}")
        _atomic_write(self._dir(task_id) / name, data)

    def clear_results(self, task_id: str, *, lease: int) -> None:
        """Drop results of an earlier attempt (raw/ is kept: it is what a resumed task reuses).
        One process writes here, so there is one set of results whatever the lease."""
        task_dir = self._dir(task_id)
        shutil.rmtree(task_dir / "images", ignore_errors=True)
        for name in RESULT_FILES:
            (task_dir / name).unlink(missing_ok=True)

    # --- downloads ---

    def open_result(self, record: TaskRecord, name: str) -> BinaryIO:
        """An open stream of ``full.md``, ``layout.json``, ``result.json`` or ``images/<name>``."""
        task_id = record.task_id
        task_dir = self._dir(task_id)
        if name in RESULT_FILES:
            path = task_dir / name
        elif name.startswith("images/") and IMAGE_NAME.match(name.removeprefix("images/")):
            path = task_dir / "images" / name.removeprefix("images/")
        else:
            raise ResultNotFound(f"task {task_id} has no result named {name!r}")
        try:
            return path.open("rb")
        except FileNotFoundError as exc:
            raise ResultNotFound(f"task {task_id} has no result named {name!r}") from exc

    def result_url(self, record: TaskRecord, name: str) -> str | None:
        return None  # files on this disk are streamed by the service
