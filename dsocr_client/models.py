"""The client's typed views of the API's JSON: a task and a progress update.

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


@dataclass(frozen=True)
class Task:
    """A task as ``GET /v1/tasks/{id}`` shows it.

    ``images`` are the figure names (``p0003_01.png``) of a succeeded task; ``filename`` is the
    uploaded name or the URL's.
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
