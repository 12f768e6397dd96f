"""Routes of a task's results under ``/v1/tasks/{id}``: result.md, result.json, layout.json, images,
the exports (chunks.json, result.html, result.docx), page previews, the zip, share links and
publishing.

Ownership, one rule for every download: ``VisibleTask`` reads the task's record once, for a caller
who may see it (404 as for a missing task otherwise), and every handler hands that record on.

Usage: every byte a route here streams counts as bytes out of the task's tenant (``metered``); a
307 to the bucket sends none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from app.api.deps import ApiKeyDep, CallerDep, TasksDep
from app.formats import CHARS
from app.formats.chunks import DEFAULT_MAX_TOKENS, DEFAULT_OVERLAP
from app.formats.html import CONTENT_SECURITY_POLICY
from app.records import PublishState, TaskRecord
from app.result_files import (
    ARCHIVE_NAME,
    ARCHIVE_TYPE,
    EXPORT_FILES,
    IMAGE_TYPE,
    PREVIEW_CONTENT_TYPE,
    RESULT_FILES,
)
from app.schemas import ErrorBody, LinkCreate, LinkView
from app.storage.archive import CHUNK
from app.tasks.downloads import Downloads
from app.tasks.followups import FollowUps
from app.tasks.usage import UsageMeter

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[ApiKeyDep])

TaskId = Annotated[str, Path(description="The task id returned at creation.", max_length=64)]
# As documented for every route of /v1/tasks since they shared one router.
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


async def get_downloads(request: Request) -> Downloads:  # async: no thread hop (see app.api.deps)
    return request.app.state.downloads


async def get_followups(request: Request) -> FollowUps:
    return request.app.state.followups


async def get_meter(request: Request) -> UsageMeter:
    return request.app.state.usage


async def _visible_task(task_id: TaskId, tasks: TasksDep, caller: CallerDep) -> TaskRecord:
    """The path's task, once the caller may see it (``TaskNotFound``, 404, as for a missing one,
    otherwise): the one read of its record in a download."""
    return await tasks.get(task_id, caller)


DownloadsDep = Annotated[Downloads, Depends(get_downloads)]
FollowUpsDep = Annotated[FollowUps, Depends(get_followups)]
VisibleTask = Annotated[TaskRecord, Depends(_visible_task)]
MeterDep = Annotated[UsageMeter, Depends(get_meter)]

Redirect = Annotated[
    bool,
    Query(
        description="With APP_S3_REDIRECT_DOWNLOADS, false streams the file through the service instead "
        "of a 307 to the bucket (for browsers whose page may not fetch from the bucket's origin).",
    ),
]

MaxTokens = Annotated[
    int,
    Query(
        ge=1,
        le=1_000_000,
        description="The most tokens a chunk holds (a table, equation or figure is never split, even "
        "when it is larger).",
    ),
]
Overlap = Annotated[
    int,
    Query(ge=0, le=1_000_000, description="Tokens a chunk repeats of the text before it; below max_tokens."),
]
TokenizerName = Annotated[
    str,
    Query(
        max_length=200,
        description=f'"{CHARS}" (an estimate: 4 characters a token) or the Hugging Face repository id '
        "of a tokenizer in the server's cache (nothing is downloaded).",
    ),
]


def file_headers(task_id: str, name: str) -> dict[str, str]:
    """Headers that go with result file ``name`` however it is fetched (its route or a share link):
    a file name for the zip and the DOCX, and for the HTML page its own policy, with ``sandbox``
    added: opened from this origin it gets a unique origin of its own, so even a sanitiser bug
    could not reach the API or the console's key from it."""
    if name == "result.html":
        return {"Content-Security-Policy": f"{CONTENT_SECURITY_POLICY}; sandbox"}
    if name in (ARCHIVE_NAME, "result.docx"):
        suffix = name.rsplit(".", 1)[1]
        return {"Content-Disposition": f'attachment; filename="{task_id}.{suffix}"'}
    return {}


def metered(meter: UsageMeter, record: TaskRecord, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """``chunks`` as they are sent, counted as bytes out of ``record``'s tenant once the response
    ends or is cut short. A chunk counts once the server asks for the next one (it was sent)."""
    sent = 0
    try:
        for chunk in chunks:
            yield chunk
            sent += len(chunk)
    finally:
        meter.served(record.tenant, sent)  # never blocks: the meter writes in the background


def stream_file(handle: BinaryIO) -> Iterator[bytes]:
    """Chunks of ``handle``, closed at the end; a plain iterator, so Starlette reads it in a thread."""
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


async def result_response(
    downloads: Downloads,
    record: TaskRecord,
    name: str,
    headers: dict[str, str] | None = None,
    *,
    meter: UsageMeter,
    redirect: bool = True,
) -> Response:
    """The answer for one result file of ``record`` (a task the caller may see): a 307 to the
    bucket when the store hands out URLs and ``redirect``, else the file streamed with its type,
    its bytes counted by ``meter``. Raises ``TaskNotFinished`` before the task succeeded,
    ``ResultNotFound`` for a file it lacks."""
    found = await downloads.file(record, name, redirect=redirect)
    if isinstance(found, str):  # APP_S3_REDIRECT_DOWNLOADS: the bucket serves it, the service does not relay
        return RedirectResponse(found, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
    media_type = RESULT_FILES.get(name, IMAGE_TYPE)  # the rest are images/<name>
    return StreamingResponse(
        metered(meter, record, stream_file(found)), media_type=media_type, headers=headers
    )


@router.get("/{task_id}/result.md", responses={200: {"content": {"text/markdown": {}}}, **_ERRORS})
async def read_markdown(
    record: VisibleTask, downloads: DownloadsDep, meter: MeterDep, redirect: Redirect = True
) -> Response:
    """Download the merged Markdown of every page."""
    return await result_response(downloads, record, "full.md", meter=meter, redirect=redirect)


@router.get("/{task_id}/result.json", responses=_ERRORS)
async def read_result_json(
    record: VisibleTask, downloads: DownloadsDep, meter: MeterDep, redirect: Redirect = True
) -> Response:
    """Download the task view with every page's Markdown and blocks."""
    return await result_response(downloads, record, "result.json", meter=meter, redirect=redirect)


@router.get("/{task_id}/layout.json", responses=_ERRORS)
async def read_layout(
    record: VisibleTask, downloads: DownloadsDep, meter: MeterDep, redirect: Redirect = True
) -> Response:
    """Download the layout: every block's type, pixel box and 0-999 box per page."""
    return await result_response(downloads, record, "layout.json", meter=meter, redirect=redirect)


@router.get("/{task_id}/images/{name}", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def read_image(
    record: VisibleTask,
    name: Annotated[str, Path(max_length=64)],
    downloads: DownloadsDep,
    meter: MeterDep,
    redirect: Redirect = True,
) -> Response:
    """Download one cropped figure (names as in the task's links)."""
    return await result_response(downloads, record, f"images/{name}", meter=meter, redirect=redirect)


@router.get(
    "/{task_id}/chunks.json",
    responses={200: {"content": {EXPORT_FILES["chunks.json"]: {}}}, **_ERRORS},
)
async def read_chunks(
    record: VisibleTask,
    downloads: DownloadsDep,
    meter: MeterDep,
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS,
    overlap: Overlap = DEFAULT_OVERLAP,
    tokenizer: TokenizerName = CHARS,
) -> StreamingResponse:
    """The document split along its structure for retrieval, each chunk citing its pages and boxes."""
    chunks = await downloads.chunks(record, max_tokens=max_tokens, overlap=overlap, tokenizer=tokenizer)
    return StreamingResponse(metered(meter, record, chunks), media_type=EXPORT_FILES["chunks.json"])


@router.get(
    "/{task_id}/result.html",
    responses={200: {"content": {EXPORT_FILES["result.html"]: {}}}, **_ERRORS},
)
async def read_html(record: VisibleTask, downloads: DownloadsDep, meter: MeterDep) -> StreamingResponse:
    """The document as one self-contained HTML page: figures inlined, math as MathML, no script."""
    page = await downloads.html(record)
    headers = file_headers(record.task_id, "result.html")
    return StreamingResponse(
        metered(meter, record, page), media_type=EXPORT_FILES["result.html"], headers=headers
    )


@router.get(
    "/{task_id}/result.docx",
    responses={200: {"content": {EXPORT_FILES["result.docx"]: {}}}, **_ERRORS},
)
async def read_docx(record: VisibleTask, downloads: DownloadsDep, meter: MeterDep) -> StreamingResponse:
    """The document as a Word file: headings, paragraphs, tables, figures, equations as Office Math."""
    handle = await downloads.docx(record)
    headers = file_headers(record.task_id, "result.docx")
    body = metered(meter, record, stream_file(handle))
    return StreamingResponse(body, media_type=EXPORT_FILES["result.docx"], headers=headers)


@router.get("/{task_id}/pages/{number}", responses={200: {"content": {PREVIEW_CONTENT_TYPE: {}}}, **_ERRORS})
async def read_page_preview(
    record: VisibleTask,
    number: Annotated[int, Path(ge=1, le=100_000, description="The page number in the document.")],
    downloads: DownloadsDep,
    meter: MeterDep,
) -> StreamingResponse:
    """The rendered page as a WebP preview (at most 1600 px a side), as soon as the page is rendered:
    the boxes of ``layout.json`` scale by its size over the page's ``width`` and ``height``."""
    handle = await downloads.preview(record, number)
    # Rewritten only when a resumed task renders the page again, to the same pixels: cache briefly.
    headers = {"Cache-Control": "private, max-age=300"}
    body = metered(meter, record, stream_file(handle))
    return StreamingResponse(body, media_type=PREVIEW_CONTENT_TYPE, headers=headers)


@router.get("/{task_id}/result.zip", responses={200: {"content": {ARCHIVE_TYPE: {}}}, **_ERRORS})
async def read_archive(record: VisibleTask, downloads: DownloadsDep, meter: MeterDep) -> StreamingResponse:
    """Download full.md, layout.json, result.json, the exports and images/ as one zip, streamed as it
    is built."""
    chunks = downloads.archive(record)
    return StreamingResponse(
        metered(meter, record, chunks),
        media_type=ARCHIVE_TYPE,
        headers=file_headers(record.task_id, ARCHIVE_NAME),
    )


@router.post(
    "/{task_id}/publish",
    response_model=PublishState,
    responses={502: {"model": ErrorBody, "description": "the upload failed"}, **_ERRORS},
)
async def publish_task(record: VisibleTask, followups: FollowUpsDep) -> PublishState:
    """Publish a succeeded task's results (APP_PUBLISH_BACKEND) and return links to them."""
    return await followups.publish(record.task_id)


@router.post(
    "/{task_id}/links", status_code=status.HTTP_201_CREATED, response_model=LinkView, responses=_ERRORS
)
async def create_link(record: VisibleTask, body: LinkCreate, downloads: DownloadsDep) -> LinkView:
    """Create a signed, expiring link to one result file that works without an API key."""
    link = downloads.issue_link(record, body.file, body.expires_in)
    return LinkView(file=link.file, url=link.url, expires_at=link.expires_at)
