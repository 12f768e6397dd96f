"""Publishing a succeeded task's results where the systems that want them can fetch them.

One publisher per service, chosen by ``APP_PUBLISH_BACKEND``:

- ``BucketPublisher`` (``s3``, ``oss``) uploads ``full.md``, ``layout.json``, ``result.json``, the
  exports (``chunks.json``, ``result.html``, ``result.docx``, built while they upload),
  ``result.zip`` and every ``images/`` file to ``<prefix>/<task_id>/<name>`` with its content type,
  each file tried up to ``max_attempts`` times with exponential backoff, then presigns a GET link
  per file. Uploads overwrite: publishing twice is harmless.
- ``LinkPublisher`` (``local``) uploads nothing; its links are share links to this service.

Either returns a ``PublishState`` that succeeded, or raises ``PublishFailed``. Neither touches the
task's status or its files; messages name files and buckets, never credentials.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Protocol

from app.config import Settings
from app.errors import BackendUnavailable, BucketRefused, PublishFailed, StorageError
from app.records import DeliveryStatus, PublishState, TaskRecord
from app.storage.archive import ExportBuilder, ResultFile, open_result, result_files
from app.storage.base import TaskStore
from app.storage.links import LinkSigner
from app.storage.s3 import BucketConfig, S3Bucket, s3_bucket_config

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 60.0


class Publisher(Protocol):
    """Publishes a succeeded task's result files and returns links that need no API key."""

    backend: str  # "local", "s3" or "oss": shown on the task's publish state

    async def publish(self, record: TaskRecord, exports: ExportBuilder) -> PublishState:
        """Publish every file of ``result_files(record)``, the exports built by ``exports``;
        raises ``PublishFailed``."""
        ...

    def close(self) -> None:
        """Release connections; called once at shutdown."""
        ...


def _published(backend: str, links: dict[str, str], expires_at: datetime) -> PublishState:
    return PublishState(
        status=DeliveryStatus.SUCCEEDED,
        backend=backend,
        links=links,
        expires_at=expires_at,
        finished_at=datetime.now(UTC),
    )


def _expiry(seconds: int) -> tuple[int, datetime]:
    expires = int(time.time()) + seconds
    return expires, datetime.fromtimestamp(expires, UTC)


class LinkPublisher:
    """``local``: nothing leaves the box; each file gets a share link to this service."""

    backend = "local"

    def __init__(self, signer: LinkSigner, *, expire_seconds: int, base_url: str | None) -> None:
        self._signer = signer
        self._expire_seconds = expire_seconds
        self._base_url = (base_url or "").rstrip("/")  # empty: links relative to the service root

    async def publish(self, record: TaskRecord, exports: ExportBuilder) -> PublishState:
        # The share links name the exports; the service builds them when a link is followed.
        expires, expires_at = _expiry(self._expire_seconds)
        links = {
            file.name: self._base_url + self._signer.path(record.task_id, file.name, expires)
            for file in result_files(record)
        }
        return _published(self.backend, links, expires_at)

    def close(self) -> None:
        pass


class BucketPublisher:
    """``s3`` and ``oss``: uploads to a bucket and presigns links for ``expire_seconds``."""

    def __init__(
        self,
        bucket: S3Bucket,
        *,
        backend: str,
        store: TaskStore,
        prefix: str,
        expire_seconds: int,
        max_attempts: int,
        backoff_seconds: float,
    ) -> None:
        self.backend = backend
        self.bucket = bucket
        self._store = store
        self._prefix = prefix.strip("/")
        self._expire_seconds = expire_seconds
        self._max_attempts = max_attempts
        self._backoff_seconds = backoff_seconds

    def key(self, task_id: str, name: str) -> str:
        """The object key of one result file: ``<prefix>/<task_id>/<name>``."""
        return "/".join(part for part in (self._prefix, task_id, name) if part)

    async def publish(self, record: TaskRecord, exports: ExportBuilder) -> PublishState:
        files = result_files(record)
        for file in files:
            await self._upload(record, file, exports)
        expires_at = _expiry(self._expire_seconds)[1]

        def presign_all() -> dict[str, str]:
            return {
                file.name: self.bucket.presign(self.key(record.task_id, file.name), self._expire_seconds)
                for file in files
            }

        try:
            links = await asyncio.to_thread(presign_all)
        except (StorageError, BackendUnavailable) as exc:
            raise PublishFailed(f"the results were uploaded but {exc.message}") from exc
        return _published(self.backend, links, expires_at)

    async def _upload(self, record: TaskRecord, file: ResultFile, exports: ExportBuilder) -> None:
        key = self.key(record.task_id, file.name)
        for attempt in range(1, self._max_attempts + 1):
            try:
                await asyncio.to_thread(self._upload_once, record, file, key, exports)
                return
            except (StorageError, BackendUnavailable) as exc:
                if not _retriable(exc) or attempt == self._max_attempts:
                    raise PublishFailed(
                        f"uploading {file.name} to {self.backend} bucket {self.bucket.name} failed "
                        f"after {attempt} attempt{'s' if attempt > 1 else ''}: {exc.message}"
                    ) from exc
                delay = min(self._backoff_seconds * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
                log.info(
                    "uploading %s of task %s failed (%s); trying again in %.1f s",
                    file.name,
                    record.task_id,
                    exc.message,
                    delay,
                )
                await asyncio.sleep(delay)

    def _upload_once(self, record: TaskRecord, file: ResultFile, key: str, exports: ExportBuilder) -> None:
        # Opened afresh for every try: a failed try may have read part of the stream.
        with open_result(self._store, record, file.name, exports) as body:
            self.bucket.upload(key, body, file.content_type)

    def close(self) -> None:
        self.bucket.close()


def _retriable(exc: StorageError | BackendUnavailable) -> bool:
    """Whether another try of a failed upload may succeed: not when the bucket refused it for good
    (a missing bucket, a denied key) or the local file could not be read (the same disk again)."""
    return isinstance(exc, BackendUnavailable) or (isinstance(exc, BucketRefused) and exc.retriable)


def publisher_from_settings(settings: Settings, *, store: TaskStore, signer: LinkSigner) -> Publisher:
    """The publisher ``APP_PUBLISH_BACKEND`` names (``Settings`` has checked its settings are complete)."""
    expire = settings.oss_sign_expire_seconds
    if settings.publish_backend == "local":
        return LinkPublisher(signer, expire_seconds=expire, base_url=settings.link_base_url)
    if settings.publish_backend == "s3":
        config = s3_bucket_config(settings)
        prefix = settings.s3_prefix
    else:
        assert settings.oss_bucket is not None
        assert settings.oss_access_key_secret is not None
        # Alibaba's documented boto3 set-up for OSS: virtual-hosted buckets, S3 signature v2
        # (OSS refuses the chunked bodies boto3's v4 signing may send).
        config = BucketConfig(
            bucket=settings.oss_bucket,
            endpoint_url=settings.oss_endpoint,
            access_key_id=settings.oss_access_key_id,
            secret_access_key=settings.oss_access_key_secret.get_secret_value(),
            addressing_style="virtual",
            signature_version="s3",
        )
        prefix = settings.oss_prefix
    return BucketPublisher(
        S3Bucket(config),
        backend=settings.publish_backend,
        store=store,
        prefix=prefix,
        expire_seconds=expire,
        max_attempts=settings.publish_max_attempts,
        backoff_seconds=settings.publish_backoff_seconds,
    )
