"""The task record: what is stored in ``task.json`` and what every component reads and updates."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.documents import DocumentKind, validate_page_spec
from app.errors import TaskAlreadyFinished, TaskNotFinished

TASK_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
MAX_STRIKES = 3  # deaths of its worker in a row, with no page done in between, before a task fails


def may_see(caller: str | None, task_owner: str | None) -> bool:
    """The ownership rule: whether ``caller`` (an API key's hash) may see a task owned by
    ``task_owner``. No caller (auth off, or the service itself) sees every task; a task without an
    owner (created with auth off, or before tasks had owners) belongs to everyone."""
    return caller is None or task_owner is None or task_owner == caller


Mode = Literal["document", "free", "figure", "describe"]
Resolution = Literal["tiny", "small", "base", "large", "gundam"]
# Inside a tenant's share of the workers, its interactive tasks start before its batch ones
# (``app.tasks.queue``); across tenants the share decides, whatever the priority.
Priority = Literal["interactive", "batch"]


class TaskStatus(StrEnum):
    """Where a task is in its life; the last three are final."""

    QUEUED = "queued"  # accepted and stored, waiting for a worker (or for GPU memory)
    RUNNING = "running"  # a worker is rendering and recognising its pages
    SUCCEEDED = "succeeded"  # results are stored and downloadable
    FAILED = "failed"  # stopped by an error recorded on the task
    CANCELED = "canceled"  # stopped at the user's request

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED)


# Every legal change of status, in one place; only ``TaskRecord``'s lifecycle methods apply them.
_NEXT: dict[TaskStatus, frozenset[TaskStatus]] = {
    # A worker starts it (``start``), or a cancel ends it before it ran (``cancel``).
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELED}),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.RUNNING,  # ``start`` again: taken over from a worker that went silent
            TaskStatus.QUEUED,  # ``requeue``: a shutdown, or a restart found its worker gone
            TaskStatus.SUCCEEDED,  # ``finish``
            TaskStatus.FAILED,
            TaskStatus.CANCELED,
        }
    ),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset(),
    TaskStatus.CANCELED: frozenset(),
}


class TaskOptions(BaseModel):
    """What the user asked for; validated at submit so a task never fails on its own options."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        default="document",
        description="document: Markdown with layout; free: plain OCR; figure: parse a chart; "
        "describe: a caption",
    )
    prompt: str | None = Field(default=None, max_length=4000, description="Replaces the mode's prompt.")
    pages: str | None = Field(default=None, max_length=1000, description='1-based pages, e.g. "1-3,7".')
    dpi: int = Field(default=144, ge=36, description="PDF render resolution (dots per inch).")
    resolution: Resolution | None = Field(
        default=None, description="The model's published size modes; gundam tiles large pages."
    )
    base_size: int | None = Field(default=None, ge=256, le=2048, description="Global view in px (v1).")
    image_size: int | None = Field(default=None, ge=256, le=2048, description="Tile size in px (v1).")
    crop_mode: bool | None = Field(default=None, description="Tile large pages.")
    priority: Priority = Field(
        default="interactive",
        description="interactive: starts before this tenant's batch tasks; batch: bulk work that may "
        "wait for them. Tenants share the workers by their weights whatever the priority.",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2000,
        description="http(s) URL that gets the task view, signed, when the task ends; "
        "private addresses are refused.",
    )

    @field_validator("pages")
    @classmethod
    def _check_pages(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        validate_page_spec(value)
        return value.strip()

    @field_validator("callback_url")
    @classmethod
    def _check_callback_url(cls, value: str | None) -> str | None:
        # Syntax only: where the URL resolves to is checked at submit and again at every connect.
        if value is None or not value.strip():
            return None
        try:
            url = httpx.URL(value.strip())
        except httpx.InvalidURL as exc:
            raise ValueError(f"callback_url is not a valid URL: {exc}") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("callback_url must be an absolute http or https URL")
        return str(url)


class Progress(BaseModel):
    pages_done: int = 0
    pages_total: int = 0


class TaskUsage(BaseModel):
    """What a task cost, fixed when it ends (``app.tasks.usage``): the pages recognised and, summed
    over every recognition of them (retry rungs included), the tokens the engine read and wrote and
    its seconds, as ``raw/`` records them; and the size of its input. Bytes served by downloads are
    counted per tenant and day as they are served, not here: a finished record is not rewritten
    for every download."""

    pages: int = 0  # pages with a stored recognition
    prompt_tokens: int = 0  # tokens the engine read (image and prompt); 0 where it cannot tell
    completion_tokens: int = 0  # tokens it generated
    engine_seconds: float = 0.0  # each page's share of the wall time of the engine calls
    bytes_in: int = 0  # the uploaded (or fetched) document's size


class TaskErrorInfo(BaseModel):
    code: str
    message: str


class SourceInfo(BaseModel):
    filename: str
    content_type: str
    size_bytes: int
    pages: int  # pages (or image frames) in the document, before the ``pages`` selection
    url: str | None = None  # where a URL task was fetched from


class DeliveryStatus(StrEnum):
    """Where a publish or a webhook delivery is; the last two are final."""

    PENDING = "pending"  # planned when the task ended, not started yet (or resumed after a restart)
    RUNNING = "running"  # uploading or delivering now, or waiting before the next try
    SUCCEEDED = "succeeded"  # every file uploaded / the receiver answered 2xx
    FAILED = "failed"  # every try failed, or the error cannot be cured by retrying; see ``error``


class PublishState(BaseModel):
    """The latest publish of a task's results: how it went and the links to what it published."""

    status: DeliveryStatus
    backend: str  # "local" (share links to this service), "s3" or "oss"
    error: TaskErrorInfo | None = None
    # result name ("full.md", "result.zip", "images/p0003_01.png") -> a URL that needs no API key
    links: dict[str, str] = Field(default_factory=dict)
    expires_at: datetime | None = None  # when the links stop working
    finished_at: datetime | None = None


class WebhookState(BaseModel):
    """The delivery of the task's final view to its ``callback_url``."""

    status: DeliveryStatus
    delivery_id: str  # sent as X-Dsocr-Delivery, the same on every try, so receivers can drop repeats
    attempts: int = 0  # tries so far, counted across restarts
    response_status: int | None = None  # the receiver's answer to the latest try, if it answered
    error: TaskErrorInfo | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class QueueEstimate:
    """Where a queued task stands: its place in the queue and, once a page was timed, when it
    should start and end."""

    position: int  # 1 = the next task to start
    start_at: datetime | None
    end_at: datetime | None


class TaskRecord(BaseModel):
    """One task, as stored in ``task.json``. Only the task service and its worker change it."""

    task_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    status: TaskStatus = TaskStatus.QUEUED
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    error: TaskErrorInfo | None = None
    source: SourceInfo
    options: TaskOptions
    page_numbers: list[int]  # the selected 1-based pages, in processing order
    input_name: str  # file name of the stored input under input/
    input_kind: DocumentKind  # what the input's bytes are, sniffed at submit
    waiting_reason: str | None = None  # why a queued task has not started (e.g. GPU memory)
    cancel_requested: bool = False
    attempts: int = 0  # how many times a worker started it (restarts included); for the record only
    # Crash accounting (``start``, ``count_page``, ``interrupted``): the most pages any start had
    # done, in order, which a restart reads back instead of recognising again; that mark when the
    # latest start began; and the starts in a row whose worker died before that mark moved.
    pages_kept: int = 0
    kept_at_start: int = 0
    strikes: int = 0
    # The fencing token: raised by each worker that takes the task. A shared store refuses a write
    # carrying another token, so a worker that stalled while another took over writes nothing.
    lease: int = 0
    # Bumped by every write to a shared store, which refuses a write of a record read before another
    # (``RecordChanged``): an optimistic lock for processes that update the same finished task.
    revision: int = 0
    model: str | None = None  # the checkpoint that produced the result
    images: list[str] = Field(default_factory=list)  # figure crops under images/, once succeeded
    truncated_pages: list[int] = Field(default_factory=list)  # pages that never reached the end marker
    suspect_pages: int = 0  # pages still suspect after the retry ladder (app.pipeline.quality)
    retries: int = 0  # retry rungs run (or read back) for the pages done, summed
    publish: PublishState | None = None  # set when a publish is planned (auto) or asked for
    webhook: WebhookState | None = None  # set when a task with a callback_url ends
    # The owner id of the tenant that created the task (``app.tenants``: an HMAC of an APP_API_KEYS
    # key, or of a file tenant's name), never a key; every key of that tenant sees it, no other does.
    # None: created with auth off, or before tasks had owners: visible to all.
    owner: str | None = None
    # The name of that tenant (``app.tenants.Tenant.name``); None: created with auth off, or before
    # tenants existed. Quotas, fair share and usage go by it.
    tenant: str | None = None
    usage: TaskUsage | None = None  # what it cost, set when it ends (``app.tasks.usage``)
    # The id of the latest event published about this task (``app.tasks.events``); saved before the
    # event goes out, so event ids keep increasing across restarts. 1 stands for "accepted".
    last_event_id: int = 0

    def visible_to(self, caller: str | None) -> bool:
        """Whether ``caller`` may see this task (``may_see``); one it may not is reported exactly
        as a missing one."""
        return may_see(caller, self.owner)

    def require_succeeded(self) -> None:
        """Raise ``TaskNotFinished`` unless the task succeeded: its results exist only then."""
        if self.status is not TaskStatus.SUCCEEDED:
            raise TaskNotFinished(
                f"task {self.task_id} is {self.status.value}; results exist once it succeeded"
            )

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()

    # --- the life of a start, and the crash rule ---
    #
    # A worker process can die under a task (kill -9, the OOM killer, a node lost, a rolling deploy
    # that outlasts the grace period), and the task is then started again: by ``recover`` at the
    # next start-up, or by the worker a shared queue redelivers it to. Most deaths are not the
    # document's fault, and a start that got a page further lost nothing: its pages are read back
    # by the next one. So a death counts against the task (a *strike*) only when the start it ended
    # had done no page beyond what earlier starts had done; any progress clears the strikes. While
    # there is none, the first page not done stays the same, so the strikes are that page's: a page
    # that kills its worker every time fails the task after ``MAX_STRIKES`` deaths, naming it,
    # however many deaths the pages before it had survived.
    #
    # A page counts once it is assembled and saved on the record, which comes a moment after its
    # raw output is stored. A death in that moment is a strike although a page was stored; the next
    # start reads that page back before anything else and counts it, so the strike is cleared there.

    # --- the lifecycle: the only code that changes ``status`` (legal moves: ``_NEXT``) ---

    def _move(self, to: TaskStatus) -> None:
        if to not in _NEXT[self.status]:
            if self.status.is_final:
                raise TaskAlreadyFinished(f"task {self.task_id} already {self.status.value}")
            raise RuntimeError(f"task {self.task_id}: no move from {self.status.value} to {to.value}")
        self.status = to

    def start(self) -> None:
        """A worker takes the task: a new lease (the fencing token), ``running``, and the mark the
        next death's progress is measured from. Call ``interrupted`` first when the previous start
        ended with its worker's death."""
        self._move(TaskStatus.RUNNING)
        self.lease += 1
        self.started_at = datetime.now(UTC)
        self.finished_at = None
        self.attempts += 1
        self.waiting_reason = None
        self.error = None
        self.kept_at_start = self.pages_kept

    def finish(self, status: TaskStatus, error: TaskErrorInfo | None = None) -> None:
        """The task ends: ``status`` is final, ``error`` says why it failed. Raises
        ``TaskAlreadyFinished`` when it had ended already."""
        if not status.is_final:
            raise ValueError(f"{status.value} is not a final status")
        self._move(status)
        self.error = error
        self.finished_at = datetime.now(UTC)
        self.waiting_reason = None

    def requeue(self, reason: str) -> None:
        """Back to ``queued`` from a start that did not end (a shutdown, or a restart that found its
        worker gone); the next start resumes from the stored pages. ``reason`` is shown meanwhile."""
        self._move(TaskStatus.QUEUED)
        self.started_at = None
        self.waiting_reason = reason

    def cancel(self) -> bool:
        """A cancel is asked for. A queued task ends ``canceled`` now (returns True); a running one
        only records the request, which its worker honours at the next page boundary (False).
        Raises ``TaskAlreadyFinished`` for a task that has ended."""
        if self.status.is_final:
            raise TaskAlreadyFinished(f"task {self.task_id} already {self.status.value}")
        self.cancel_requested = True
        if self.status is TaskStatus.QUEUED:
            self.finish(TaskStatus.CANCELED)
            return True
        return False

    def count_page(self, number: int, *, truncated: bool, suspect: bool = False, retries: int = 0) -> None:
        """The running start has done page ``number``, the next one in order (done now, or read
        back from an earlier start's raw output), after ``retries`` retry rungs, still ``suspect``
        or not. A start counts from nothing (``progress.pages_done`` 0, no truncated pages, no
        suspect pages, no retries): pages read back are counted again."""
        self.progress.pages_done += 1
        self.pages_kept = max(self.pages_kept, self.progress.pages_done)
        if truncated and number not in self.truncated_pages:
            self.truncated_pages.append(number)
        self.suspect_pages += int(suspect)
        self.retries += retries

    def interrupted(self) -> bool:
        """The worker of the latest start died with the task ``running`` (found so by recovery, or by
        the worker a shared queue redelivered it to). Returns whether that counts as a strike, i.e.
        the start got no page beyond the earlier ones. Call once per death, before ``start``."""
        if self.pages_kept > self.kept_at_start:
            self.strikes = 0
            return False
        self.strikes += 1
        return True

    @property
    def stuck_page(self) -> int | None:
        """The first page not done: the one the strikes are on; ``None`` once every page is done."""
        if self.pages_kept < len(self.page_numbers):
            return self.page_numbers[self.pages_kept]
        return None

    def crash_error(self) -> TaskErrorInfo | None:
        """Why the task must fail instead of running again, once ``MAX_STRIKES`` deaths in a row
        got no page further; ``None`` while it may run."""
        if self.strikes < MAX_STRIKES:
            return None
        page = self.stuck_page
        if page is None:
            cause = "while storing its results, every page being done"
        else:
            cause = (
                f"at page {page}, without finishing a page in between; that page, or one rendered just "
                "after it, may crash the service"
            )
        return TaskErrorInfo(
            code="too_many_attempts",
            message=f"its worker died {self.strikes} times in a row (crashed, ran out of memory or was "
            f"killed) {cause}. The task is not retried again",
        )
