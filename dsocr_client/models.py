"""The client's typed views of the API's JSON: a task, its result pages' quality, usage, progress.

Plain dataclasses parsed from the wire format, so the client needs nothing from the service's own
package; ``raw`` keeps the whole JSON for fields the dataclass does not name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class TaskError:
    """Why a task failed: the server's stable ``code`` and a message for people."""

    code: str
    message: str


# Why the server calls a page suspect (result.json ``pages[i].quality.reasons``); a server may add
# more, which the client passes on as they come.
SUSPECT_REASONS = ("no_end_marker", "repeating_tail", "empty_output", "low_agreement", "box_outside_page")


@dataclass(frozen=True)
class PageQuality:
    """How far to trust one result page (``result.json`` ``pages[i].quality``).

    ``text_layer_agreement`` (0-1) compares the recognised text with the PDF's own text layer;
    ``None`` for images and pages without one. ``reasons`` say why a ``suspect`` page is suspect
    (see ``SUSPECT_REASONS``); ``attempts`` counts recognitions (1 without retries) and ``rung`` is
    the retry rung whose attempt was kept (0 for the first attempt).
    """

    text_layer_agreement: float | None
    suspect: bool
    reasons: tuple[str, ...]
    attempts: int
    rung: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PageQuality:
        agreement = data.get("text_layer_agreement")
        return cls(
            text_layer_agreement=None if agreement is None else float(agreement),
            suspect=bool(data.get("suspect", False)),
            reasons=tuple(str(reason) for reason in data.get("reasons") or ()),
            attempts=int(data.get("attempts", 1)),
            rung=int(data.get("rung", 0)),
        )


@dataclass(frozen=True)
class ResultPage:
    """One page of a ``result.json``: its number, truncation mark and quality (``None`` in results
    of servers older than the quality signal); ``raw`` keeps the whole entry (Markdown, blocks)."""

    page: int
    truncated: bool
    quality: PageQuality | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultPage:
        quality = data.get("quality")
        return cls(
            page=int(data["page"]),
            truncated=bool(data.get("truncated", False)),
            quality=PageQuality.from_json(quality) if isinstance(quality, dict) else None,
            raw=data,
        )


@dataclass(frozen=True)
class Task:
    """A task as ``GET /v1/tasks/{id}`` shows it, or as its ``result.json`` holds it.

    ``images`` are the figure names (``p0003_01.png``) of a succeeded task; ``filename`` is the
    uploaded name or the URL's. ``suspect_pages`` counts the pages the server marked suspect
    (``None`` from servers older than the quality signal). ``result_pages`` are the pages of a
    ``result.json`` (with their quality), empty for a task view, whose ``pages`` are only numbers.
    """

    task_id: str
    status: str
    pages_done: int
    pages_total: int
    duration_seconds: float | None = None
    error: TaskError | None = None
    filename: str | None = None
    queue_position: int | None = None
    images: list[str] = field(default_factory=list)
    suspect_pages: int | None = None
    result_pages: list[ResultPage] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_final(self) -> bool:
        """True once the task succeeded, failed or was canceled: nothing about it changes after."""
        return self.status in FINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        """Parse a task view (or a ``result.json``, which is a task view with pages added)."""
        progress = data.get("progress") or {}
        error = data.get("error")
        source = data.get("source") or {}
        links = data.get("links") or {}
        suspect = data.get("suspect_pages")
        return cls(
            task_id=data["task_id"],
            status=data["status"],
            pages_done=int(progress.get("pages_done", 0)),
            pages_total=int(progress.get("pages_total", 0)),
            duration_seconds=data.get("duration_seconds"),
            error=TaskError(error["code"], error["message"]) if error else None,
            filename=source.get("filename") or source.get("url"),
            queue_position=data.get("queue_position"),
            images=[link.rsplit("/", 1)[-1] for link in links.get("images", [])],
            suspect_pages=None if suspect is None else int(suspect),
            result_pages=[ResultPage.from_json(p) for p in data.get("pages") or [] if isinstance(p, dict)],
            raw=data,
        )


@dataclass(frozen=True)
class Progress:
    """One update passed to ``wait``'s ``on_progress``: the task's status and pages done so far.

    ``page`` and ``seconds`` are set for a finished page (its 1-based number in the document and
    its recognition time), ``None`` for a status change.
    """

    task_id: str
    status: str
    pages_done: int
    pages_total: int
    page: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class UsageFigures:
    """What a tenant used: tasks and pages, the engine's tokens, GPU time and bytes moved.

    ``date`` is the day (``YYYY-MM-DD``) for a day's figures, ``None`` for a total."""

    tasks: int
    pages: int
    prompt_tokens: int
    completion_tokens: int
    engine_seconds: float
    bytes_in: int
    bytes_out: int
    date: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageFigures:
        return cls(
            tasks=int(data.get("tasks", 0)),
            pages=int(data.get("pages", 0)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            engine_seconds=float(data.get("engine_seconds", 0.0)),
            bytes_in=int(data.get("bytes_in", 0)),
            bytes_out=int(data.get("bytes_out", 0)),
            date=data.get("date"),
        )


@dataclass(frozen=True)
class TenantUsage:
    """One tenant's usage: per day (only the days with any, oldest first) and in total. ``tenant``
    is ``None`` for tasks made while the server had no keys."""

    tenant: str | None
    days: list[UsageFigures]
    total: UsageFigures


@dataclass(frozen=True)
class Usage:
    """``GET /v1/usage``: the caller's tenant, or every tenant for an admin key, from ``start`` to
    ``end`` (both ``YYYY-MM-DD``, inclusive, as the server settled them); ``raw`` keeps the JSON."""

    start: str
    end: str
    tenants: list[TenantUsage]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Usage:
        tenants = [
            TenantUsage(
                tenant=item.get("tenant"),
                days=[UsageFigures.from_json(day) for day in item.get("days") or []],
                total=UsageFigures.from_json(item.get("total") or {}),
            )
            for item in data.get("tenants") or []
        ]
        return cls(start=str(data.get("from", "")), end=str(data.get("to", "")), tenants=tenants, raw=data)
