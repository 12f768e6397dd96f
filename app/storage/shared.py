"""The scale-out ``TaskStore``: records in Redis, files in an S3-compatible bucket.

Any API replica serves any task and any worker runs it. Object keys, under ``APP_S3_PREFIX``::

    tasks/<id>/input/<name>            the upload or download
    tasks/<id>/raw/pNNNN.json          the model's output per page (what a resumed task reuses)
    tasks/<id>/raw/pNNNN.rK.json       the output of the page's retry rung K, likewise
    tasks/<id>/pages/pNNNN.tiff        each rendered page, lossless (``page_names``)
    tasks/<id>/pages/pNNNN.webp        its preview, made from it when first asked for
    tasks/<id>/out/<lease>/full.md     results of the attempt holding lease <lease>: full.md,
                                       layout.json, result.json, images/pNNNN_NN.png

Results live under their writer's lease, and downloads read the lease on the record: a worker
that stalled past the visibility timeout and wakes up after another finished the task writes into
its own ``out/<old lease>/``, which nothing reads, and its record writes are refused; the next
attempt deletes what earlier ones left there (``clear_results``). Raw pages are
shared across attempts on purpose (a resumed task skips pages already recognised); a stale writer
can only put there the output of the same page.

Uploads arrive in a local spool directory (``<data_dir>/spool``) and go up to the bucket when the
task is created. Blocking (boto3, redis-py); callers on the event loop use threads.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from app import lossless
from app.errors import BackendUnavailable, BucketRefused, ObjectMissing, ResultNotFound, StorageError
from app.records import TASK_ID_PATTERN, TaskRecord
from app.result_files import IMAGE_NAME, PREVIEW_CONTENT_TYPE, RESULT_FILES
from app.storage.base import (
    Chunks,
    RecordSummary,
    encode_preview,
    page_names,
    raw_name,
)
from app.storage.redis_records import RedisRecords
from app.storage.s3 import S3Bucket, bucket_errors

_SPOOLED = re.compile(r"^[0-9a-f]{32}$")


class SharedStore:
    """``TaskStore`` over ``RedisRecords`` and one bucket; ``redirect_seconds`` > 0 makes
    ``result_url`` hand out presigned links of that life instead of streaming through the service."""

    def __init__(
        self,
        *,
        records: RedisRecords,
        bucket: S3Bucket,
        prefix: str,
        spool_dir: Path,
        redirect_seconds: int = 0,
    ) -> None:
        self._records = records
        self._bucket = bucket
        self._s3 = bucket.client
        self._prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._spool = spool_dir
        self._redirect_seconds = redirect_seconds
        try:
            spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the spool directory {spool_dir}: {exc.strerror}") from exc

    # --- keys (private: nothing outside this class builds them) ---

    def _key(self, task_id: str, *parts: str) -> str:
        if not TASK_ID_PATTERN.match(task_id):
            raise ResultNotFound(f"no task {task_id!r}")
        return "/".join((f"{self._prefix}tasks", task_id, *parts))

    def _result_key(self, task_id: str, name: str, lease: int) -> str:
        if name in RESULT_FILES or (name.startswith("images/") and IMAGE_NAME.match(name[7:])):
            return self._key(task_id, "out", str(lease), name)
        raise ResultNotFound(f"task {task_id} has no result named {name!r}")

    # --- objects ---

    def _put(self, key: str, data: Chunks, content_type: str) -> None:
        """Write ``key``; chunks are spooled to a temporary file first (S3 wants a length)."""
        if isinstance(data, bytes):
            with bucket_errors(f"writing {key}"):
                self._s3.put_object(Bucket=self._bucket.name, Key=key, Body=data, ContentType=content_type)
            return
        with tempfile.TemporaryFile(dir=self._spool) as spooled:
            for chunk in data:
                spooled.write(chunk)
            spooled.seek(0)
            self._bucket.upload(key, spooled, content_type)

    def _get(self, key: str) -> BinaryIO | None:
        """An open stream of ``key``; ``None`` when there is no such object."""
        try:
            with bucket_errors(f"reading {key}"):
                return self._s3.get_object(Bucket=self._bucket.name, Key=key)["Body"]
        except ObjectMissing:
            return None

    def _delete_prefix(self, prefix: str, *, keep: str | None = None) -> None:
        """Delete every object under ``prefix``, except those under ``keep``."""
        with bucket_errors(f"deleting {prefix}"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket.name, Prefix=prefix
            )
            for page in pages:
                keys = [
                    {"Key": item["Key"]}
                    for item in page.get("Contents", [])
                    if keep is None or not item["Key"].startswith(keep)
                ]
                if keys:  # at most 1000 a page, as many as one delete_objects takes
                    self._s3.delete_objects(Bucket=self._bucket.name, Delete={"Objects": keys, "Quiet": True})

    # --- uploads and health ---

    def spool_path(self) -> Path:
        return self._spool / uuid.uuid4().hex

    def clear_spool(self) -> None:
        for leftover in self._spool.iterdir():
            if _SPOOLED.match(leftover.name):
                leftover.unlink(missing_ok=True)

    def writable(self) -> bool:
        if not self._records.ping():
            return False
        try:
            with bucket_errors(f"checking bucket {self._bucket.name}"):
                self._s3.head_bucket(Bucket=self._bucket.name)
        except (BucketRefused, BackendUnavailable):
            return False
        return True

    # --- records ---

    def create(self, record: TaskRecord, spooled_input: Path) -> None:
        key = self._key(record.task_id, "input", record.input_name)
        try:
            with spooled_input.open("rb") as body:
                self._bucket.upload(key, body, "application/octet-stream")
        except OSError as exc:  # opening the spooled file (S3Bucket.upload translates reading it)
            raise StorageError(f"cannot store task {record.task_id}: {exc.strerror}") from exc
        self._records.create(record)

    def save(self, record: TaskRecord, *, expect_lease: int | None = None) -> None:
        self._records.save(record, expect_lease=expect_lease)

    def load(self, task_id: str) -> TaskRecord:
        return self._records.load(task_id)

    def list_records(self) -> Iterator[TaskRecord]:
        return self._records.list_records()

    def summaries(self) -> list[RecordSummary]:
        return self._records.summaries()

    def delete(self, task_id: str) -> None:
        self._delete_prefix(self._key(task_id) + "/")
        self._records.delete(task_id)

    def request_cancel(self, task_id: str) -> None:
        self._records.request_cancel(task_id)

    def read_key(self, name: str) -> dict[str, Any] | None:
        return self._records.read_key(name)

    def write_key(self, name: str, entry: dict[str, Any]) -> None:
        self._records.write_key(name, entry)

    def delete_key(self, name: str) -> None:
        self._records.delete_key(name)

    def key_names(self) -> list[str]:
        return []  # Redis expires the entries itself

    def key_lock(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._records.key_lock(name)

    # --- the pipeline's files ---

    @contextlib.contextmanager
    def input_file(self, record: TaskRecord) -> Iterator[Path]:
        key = self._key(record.task_id, "input", record.input_name)
        fd, name = tempfile.mkstemp(dir=self._spool, prefix="input-")
        os.close(fd)
        try:
            try:
                with bucket_errors(f"downloading the input of task {record.task_id}"):
                    self._s3.download_file(self._bucket.name, key, name)
            except ObjectMissing:
                raise StorageError(f"the input of task {record.task_id} is missing") from None
            yield Path(name)
        finally:
            Path(name).unlink(missing_ok=True)

    def write_raw(self, task_id: str, number: int, payload: dict[str, Any], attempt: int = 0) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self._put(self._key(task_id, "raw", raw_name(number, attempt)), data, "application/json")

    def read_raw(self, task_id: str, number: int, attempt: int = 0) -> dict[str, Any] | None:
        body = self._get(self._key(task_id, "raw", raw_name(number, attempt)))
        if body is None:
            return None
        with body:
            try:
                payload = json.loads(body.read())
            except ValueError:
                return None
        return payload if isinstance(payload, dict) else None

    def write_preview(self, task_id: str, number: int, page: bytes) -> None:
        self._put(self._key(task_id, "pages", page_names(number)[0]), page, lossless.MEDIA_TYPE)

    def open_preview(self, record: TaskRecord, number: int) -> BinaryIO:
        """The preview, made from the stored page and kept the first time it is asked for."""
        body = self._get(self._key(record.task_id, "pages", f"p{number:04d}.webp"))
        if body is not None:
            return body
        for name in page_names(number):
            source = self._get(self._key(record.task_id, "pages", name))
            if source is not None:
                break
        else:
            raise ResultNotFound(f"task {record.task_id} has no rendered page {number} (yet)")
        with source:
            preview = encode_preview(source.read())
        self._put(self._key(record.task_id, "pages", f"p{number:04d}.webp"), preview, PREVIEW_CONTENT_TYPE)
        return io.BytesIO(preview)

    def write_image(self, task_id: str, name: str, png: bytes, *, lease: int = 0) -> None:
        if not IMAGE_NAME.match(name):
            raise StorageError(f"refusing to write an image named {name!r}")
        self._put(self._result_key(task_id, f"images/{name}", lease), png, "image/png")

    def write_result(self, task_id: str, name: str, data: Chunks, *, lease: int = 0) -> None:
        if name not in RESULT_FILES:
            raise StorageError(f"unknown result file {name!r}")
        self._put(self._result_key(task_id, name, lease), data, RESULT_FILES[name])

    def clear_results(self, task_id: str, *, lease: int) -> None:
        """Drop what earlier attempts left under their own leases: a worker that wrote its results
        and then let go of the task (Redis went away, or another worker took it, before its record
        was saved) leaves an ``out/<old lease>/`` that nothing reads. Attempt ``lease`` has
        written nothing yet; a stale writer still running is refused at its record write."""
        self._delete_prefix(self._key(task_id, "out") + "/", keep=self._key(task_id, "out", str(lease)) + "/")

    # --- downloads ---

    def open_result(self, record: TaskRecord, name: str) -> BinaryIO:
        """The file as the attempt holding ``record.lease`` wrote it: the record is the caller's,
        not read again (a download reads the record once)."""
        body = self._get(self._result_key(record.task_id, name, record.lease))
        if body is None:
            raise ResultNotFound(f"task {record.task_id} has no result named {name!r}")
        return body

    def result_url(self, record: TaskRecord, name: str) -> str | None:
        if not self._redirect_seconds:
            return None
        key = self._result_key(record.task_id, name, record.lease)
        return self._bucket.presign(key, self._redirect_seconds)

    def close(self) -> None:
        self._bucket.close()
