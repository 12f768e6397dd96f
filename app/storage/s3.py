"""An S3-compatible bucket through boto3: uploads with a content type, and presigned GET links.

Reaches AWS S3, MinIO, Cloudflare R2, Ceph and Alibaba OSS (through OSS's S3-compatible API).
Signing, presigning included, is boto3's own. Blocking: callers on the event loop run these
methods in a thread. ``bucket_errors`` is the one translation of botocore's exceptions into the
error tree, for this class and for the scale-out store (``app.storage.shared``); its messages never
carry credentials.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from app.config import Settings
from app.errors import BackendUnavailable, BucketRefused, ObjectMissing, StorageError

CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
# Statuses worth another try: throttling, timeouts and the server's own failures.
_RETRIABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Error codes of a missing object: GetObject's NoSuchKey, and HEAD answers, which have no body.
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class BucketConfig:
    """Where and how to reach a bucket; keys unset means boto3's own chain (env, IAM role)."""

    bucket: str
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    signature_version: str = "s3v4"
    # Tries per call. 1 for publishing, which retries with its own backoff and records each failure;
    # more for task storage, where botocore's standard retries ride out a throttle or a dropped connection.
    max_attempts: int = 1


def s3_bucket_config(settings: Settings, *, max_attempts: int = 1) -> BucketConfig:
    """The ``APP_S3_*`` bucket, shared by publishing and the scale-out task storage."""
    assert settings.s3_bucket is not None  # Settings refuses s3 publishing or storage without one
    secret = settings.s3_secret_access_key
    return BucketConfig(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        addressing_style=settings.s3_addressing_style,
        max_attempts=max_attempts,
    )


@contextlib.contextmanager
def bucket_errors(what: str) -> Iterator[None]:
    """botocore's exceptions inside the block as the service's, ``what`` (e.g. "reading <key>")
    saying what was asked: an answer that the object is missing is ``ObjectMissing``; any other
    error answer ``BucketRefused``, retriable for throttling, timeouts and the bucket's own failures;
    no answer at all (cannot connect, timed out, dropped, no credentials to sign with: botocore's
    ``BotoCoreError``) ``BackendUnavailable``. Anything else passes through unchanged."""
    try:
        yield
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _MISSING:
            raise ObjectMissing(f"no such object in the bucket ({what})") from exc
        detail = f"{code or 'error'} ({status}): {error.get('Message', '')}".rstrip(": ")
        raise BucketRefused(
            f"the bucket refused {what}: {detail}", retriable=status in _RETRIABLE_STATUS
        ) from exc
    except BotoCoreError as exc:  # after botocore's own retries, where the config allows any
        raise BackendUnavailable(f"{what} failed before the bucket answered: {exc}") from exc


class S3Bucket:
    """One bucket, one thread-safe boto3 client; ``close()`` releases its connections."""

    def __init__(self, config: BucketConfig) -> None:
        self.name = config.bucket
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=Config(
                signature_version=config.signature_version,
                s3={"addressing_style": config.addressing_style},
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
                read_timeout=READ_TIMEOUT_SECONDS,
                retries={"max_attempts": config.max_attempts, "mode": "standard"},
                # boto3's default checksum trailers (aws-chunked bodies) are refused by several
                # S3-compatible stores, OSS among them; send checksums only where S3 requires them.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        # Streams of unknown length (the zip) go up in 8 MiB parts; two at a time bounds memory.
        self._transfer = TransferConfig(max_concurrency=2)

    @property
    def client(self) -> Any:
        """The boto3 client (thread-safe), for the task storage's reads, writes and deletes."""
        return self._client

    def upload(self, key: str, body: BinaryIO, content_type: str) -> None:
        """Upload ``body`` (read to its end, seekable or not) to ``key``.

        Raises as ``bucket_errors`` translates, and ``StorageError`` when reading ``body`` fails
        (another try would read the same disk).
        """
        try:
            with bucket_errors(f"uploading {key}"):
                self._client.upload_fileobj(
                    body, self.name, key, ExtraArgs={"ContentType": content_type}, Config=self._transfer
                )
        except OSError as exc:
            raise StorageError(f"reading the file to upload to {key} failed: {exc}") from exc

    def presign(self, key: str, expires_seconds: int) -> str:
        """A GET URL for ``key`` that works without credentials for ``expires_seconds``; signed
        here, without asking the bucket. Raises as ``bucket_errors`` translates (no credentials)."""
        with bucket_errors(f"signing a link to {key}"):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.name, "Key": key}, ExpiresIn=expires_seconds
            )

    def close(self) -> None:
        self._client.close()
