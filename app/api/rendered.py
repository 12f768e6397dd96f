"""``GET /v1/tasks/{id}/pages/{n}/rendered``: a result page's blocks as sanitised HTML, for the web
console, which links each block's HTML to its box on the page image."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path

from app.api.deps import ApiKeyDep
from app.api.results import DownloadsDep, VisibleTask
from app.render.page import RenderedPage, render_page
from app.schemas import ErrorBody

router = APIRouter(prefix="/v1/tasks", tags=["console"], dependencies=[ApiKeyDep])
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 409)}


@router.get("/{task_id}/pages/{page}/rendered", response_model=RenderedPage, responses=_ERRORS)
async def read_rendered_page(
    record: VisibleTask,
    page: Annotated[int, Path(ge=1, le=100_000, description="The 1-based page number in the document.")],
    downloads: DownloadsDep,
) -> RenderedPage:
    """Read one page of a succeeded task with every layout block's content as sanitised HTML."""
    entry = await downloads.stored_page(record, page)
    return await anyio.to_thread.run_sync(render_page, entry)
