"""``GET /v1/tasks/{id}/pages/{n}/rendered``: a result page's blocks as sanitised HTML, for the web
console, which links each block's HTML to its box on the page image."""

from __future__ import annotations

import json
from typing import Annotated, Any, BinaryIO

import anyio
from fastapi import APIRouter, Path

from app.api.deps import ApiKeyDep, CallerDep, TasksDep
from app.errors import ResultNotFound, StorageError
from app.render.page import RenderedPage, StoredPage, render_page
from app.schemas import ErrorBody

router = APIRouter(prefix="/v1/tasks", tags=["console"], dependencies=[ApiKeyDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 409)}


@router.get("/{task_id}/pages/{page}/rendered", response_model=RenderedPage, responses=_ERRORS)
async def read_rendered_page(
    task_id: Annotated[str, Path(max_length=64)],
    page: Annotated[int, Path(ge=1, le=100_000, description="The 1-based page number in the document.")],
    tasks: TasksDep,
    caller: CallerDep,
) -> RenderedPage:
    """Read one page of a succeeded task with every layout block's content as sanitised HTML."""
    handle = await tasks.open_result(task_id, "result.json", caller)
    entry = await anyio.to_thread.run_sync(_stored_page, handle, task_id, page)
    return await anyio.to_thread.run_sync(render_page, entry)


def _stored_page(handle: BinaryIO, task_id: str, number: int) -> StoredPage:
    """Page ``number`` of the open ``result.json``; ``ResultNotFound`` when the result has no such page."""
    with handle:
        try:
            pages = json.load(handle)["pages"]
            entry = next((p for p in pages if p["page"] == number), None)
            stored = None if entry is None else StoredPage.model_validate(entry)
        # Bad JSON or an unexpected shape; pydantic's ValidationError is a ValueError.
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"result.json of task {task_id} is not readable: {exc}") from exc
    if stored is None:
        raise ResultNotFound(f"task {task_id} has no page {number} in its result")
    return stored
