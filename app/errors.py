"""The one error tree of the service.

Every error a user can see is a ``DsocrError``; the API maps the tree to status codes in one place
(``app.api.errors``) and always answers ``{"error": {"code", "message"}}``. A task that fails
stores the same ``code`` and ``message`` on its record.

    DsocrError (500, internal_error)
    ├── ClientError (400, bad_request)
    │   ├── Unauthorized (401, unauthorized)
    │   ├── Forbidden (403, forbidden)
    │   ├── LinkInvalid (403, link_invalid)
    │   │   └── LinkExpired (403, link_expired)
    │   ├── TaskNotFound (404, task_not_found)
    │   ├── ResultNotFound (404, result_not_found)
    │   ├── TaskNotFinished (409, task_not_finished)
    │   ├── TaskAlreadyFinished (409, task_finished)
    │   ├── PayloadTooLarge (413, payload_too_large)
    │   ├── UnsupportedMediaType (415, unsupported_media_type)
    │   ├── InvalidOptions (422, invalid_options)
    │   ├── InvalidDocument (422, invalid_document)
    │   │   └── DocumentTooComplex (422, document_too_complex)
    │   │       ├── RenderTimeout (422, render_timeout)
    │   │       └── RenderMemoryExceeded (422, render_memory_exceeded)
    │   ├── TooManyPages (422, too_many_pages)
    │   ├── IdempotencyKeyReused (422, idempotency_key_reused)
    │   ├── UrlNotAllowed (400, url_not_allowed)
    │   ├── UrlFetchFailed (400, url_fetch_failed)
    │   ├── QueueFull (429, queue_full; carries retry_after seconds)
    │   └── QuotaExceeded (429, quota_exceeded; carries the limit, its quota and reset seconds)
    │       └── TooManyConnections (429, too_many_connections)
    └── ServerError (500, internal_error)
        ├── ServiceUnavailable (503, service_unavailable)
        ├── EngineError (500, engine_error)
        │   └── ModelUnavailable (503, model_unavailable)
        ├── StorageError (500, storage_error)
        │   └── BucketRefused (500, storage_error; carries retriable)
        │       └── ObjectMissing (500, storage_error; callers turn it into their own answer)
        ├── PageFailed (500, page_failed)
        ├── PublishFailed (502, publish_failed)
        └── TaskCanceled (499, canceled; internal: stops a running task at a page boundary)

Library exceptions (torch, httpx, PyMuPDF, PIL) are translated where the library is called,
``raise EngineError(...) from exc``, so nothing else leaks into a response or a task record.
"""

from __future__ import annotations


class DsocrError(Exception):
    """Base of every error the service reports; ``code`` is stable, ``message`` is for people."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientError(DsocrError):
    """The request cannot be served as sent; retrying it unchanged gives the same answer."""

    status_code = 400
    code = "bad_request"


class Unauthorized(ClientError):
    """Raised when a route needs an API key and the request has none or a wrong one."""

    status_code = 401
    code = "unauthorized"


class Forbidden(ClientError):
    """Raised when a valid key asks for what its role does not allow (another tenant's usage)."""

    status_code = 403
    code = "forbidden"


class LinkInvalid(ClientError):
    """Raised for a share link whose signature does not match (tampered, or from another secret)."""

    status_code = 403
    code = "link_invalid"


class LinkExpired(LinkInvalid):
    """Raised for a correctly signed share link used after its expiry."""

    code = "link_expired"


class TaskNotFound(ClientError):
    """Raised for a task id that does not exist (or expired, or is malformed)."""

    status_code = 404
    code = "task_not_found"


class ResultNotFound(ClientError):
    """Raised for a result file (an image name, say) that the task does not have."""

    status_code = 404
    code = "result_not_found"


class TaskNotFinished(ClientError):
    """Raised when a result is asked for before the task succeeded."""

    status_code = 409
    code = "task_not_finished"


class TaskAlreadyFinished(ClientError):
    """Raised when canceling a task that already ended."""

    status_code = 409
    code = "task_finished"


class PayloadTooLarge(ClientError):
    """Raised when an upload or a fetched URL passes ``APP_MAX_UPLOAD_MB``."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(ClientError):
    """Raised when the bytes are not a PDF, PNG, JPEG, WebP, TIFF or BMP."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidOptions(ClientError):
    """Raised for options that do not validate (a bad page range, an unknown mode)."""

    status_code = 422
    code = "invalid_options"


class InvalidDocument(ClientError):
    """Raised when the file has a supported type but cannot be read (corrupt, encrypted, a bomb)."""

    status_code = 422
    code = "invalid_document"


class DocumentTooComplex(InvalidDocument):
    """Raised when reading or rendering a document kills its render process (a crash); the message
    names the page. Its subclasses name the limit it passed."""

    code = "document_too_complex"


class RenderTimeout(DocumentTooComplex):
    """Raised when a page, or the submit-time check of a document, runs past
    ``APP_RENDER_PAGE_SECONDS`` (a render bomb, or a badly damaged file)."""

    code = "render_timeout"


class RenderMemoryExceeded(DocumentTooComplex):
    """Raised when a page, or the submit-time check of a document, needs more memory than
    ``APP_RENDER_MEMORY_MB`` allows a render process."""

    code = "render_memory_exceeded"


class TooManyPages(ClientError):
    """Raised when the selected pages exceed ``APP_MAX_PAGES``."""

    status_code = 422
    code = "too_many_pages"


class IdempotencyKeyReused(ClientError):
    """Raised when an ``Idempotency-Key`` comes back with another document or other options."""

    status_code = 422
    code = "idempotency_key_reused"


class UrlNotAllowed(ClientError):
    """Raised for a URL whose scheme is not http(s) or whose host resolves to a non-public address."""

    status_code = 400
    code = "url_not_allowed"


class UrlFetchFailed(ClientError):
    """Raised when a URL cannot be fetched: unreachable, timed out, or answered with an error status."""

    status_code = 400
    code = "url_fetch_failed"


class QueueFull(ClientError):
    """Raised at submit time when ``APP_QUEUE_MAX`` tasks already wait; nothing has been stored."""

    status_code = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(ClientError):
    """Raised when a tenant is at one of its limits (``app.tenants.Limits``: queued tasks, pages per
    day), before anything is stored or counted. ``limit`` names it, ``quota`` is its size over
    ``window_seconds`` (``None``: a limit on what is held at once, not per window), ``remaining``
    what is left of it, and ``retry_after`` the seconds until it resets (or a retry may pass)."""

    status_code = 429
    code = "quota_exceeded"

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        quota: int,
        retry_after: int,
        remaining: int = 0,
        window_seconds: int | None = None,
    ) -> None:
        super().__init__(message)
        self.limit = limit
        self.quota = quota
        self.retry_after = retry_after
        self.remaining = remaining
        self.window_seconds = window_seconds


class TooManyConnections(QuotaExceeded):
    """Raised before an event stream or a long-poll starts when the caller's tenant (or key), or the
    whole process, already holds as many as its limit (``event_streams``, else
    ``APP_MAX_STREAMS_PER_KEY``) or ``APP_MAX_STREAMS_TOTAL``."""

    code = "too_many_connections"


class ServerError(DsocrError):
    """The service failed; the request may succeed later or on another deployment."""


class ServiceUnavailable(ServerError):
    """Raised while the service cannot take work (starting, stopping, a worker died)."""

    status_code = 503
    code = "service_unavailable"


class EngineError(ServerError):
    """Raised when the OCR engine fails to load or to recognise a page."""

    code = "engine_error"


class ModelUnavailable(EngineError):
    """Raised when the model cannot be found, downloaded or run in this environment."""

    status_code = 503
    code = "model_unavailable"


class StorageError(ServerError):
    """Raised when a task's files cannot be written or read."""

    code = "storage_error"


class BucketRefused(StorageError):
    """Raised when an S3-compatible bucket answers a request with an error, after the client's own
    retries (``app.storage.s3.bucket_errors`` is the one translation of botocore's errors);
    ``retriable`` when a later try may succeed (throttling, a timeout, the bucket's own failure)."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


class ObjectMissing(BucketRefused):
    """Raised when the bucket has no object under the key asked for; the store turns it into
    ``ResultNotFound``, "no such file" or a missing input of its own."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retriable=False)


class BackendUnavailable(ServiceUnavailable):
    """Redis or the bucket of the scale-out mode cannot be reached (after the client's own retries)."""

    code = "backend_unavailable"


class LeaseLost(ServerError):
    """A write by a worker whose lease on the task has passed to another (a stall past the
    visibility timeout), or by a caller that read the record before a worker took it."""

    status_code = 409
    code = "lease_lost"


class RecordChanged(LeaseLost):
    """A write of a record that another process wrote since it was read (same lease): read it
    again and redo the change. A ``LeaseLost``, so that a worker that meets it lets go."""

    code = "record_changed"


class PageFailed(ServerError):
    """Raised when one page of a task cannot be processed; the message names the page."""

    code = "page_failed"


class PublishFailed(ServerError):
    """Raised when a task's results cannot be published; the task and its results are unchanged."""

    status_code = 502
    code = "publish_failed"


class TaskCanceled(ServerError):
    """Raised inside the pipeline when a cancel request is seen at a page boundary."""

    status_code = 499
    code = "canceled"
